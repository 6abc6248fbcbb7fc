//! The feed scheduler: fetches when due or asked, applies each good version as a list
//! change, and answers `feeds refresh` once its fetches are done.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use tokio::sync::oneshot;

use super::Controller;
use crate::{
    api::Response,
    feeds::{
        Feed, FeedStatus,
        fetch::{self, Outcome},
    },
};

pub(crate) struct PendingRefresh {
    waiting_for: BTreeSet<String>,
    results: BTreeMap<String, String>,
    reply: oneshot::Sender<Response>,
}

impl Controller {
    /// Starts a fetch for every feed whose refresh is due and that has none running.
    pub(crate) fn start_due_feeds(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .feeds
            .iter()
            .filter(|(_, f)| !f.in_flight && f.next_refresh <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.start_fetch(&name);
        }
    }

    pub(crate) fn start_fetch(&mut self, name: &str) {
        let Some(feed) = self.feeds.get_mut(name) else {
            return;
        };
        if feed.in_flight {
            return;
        }
        feed.in_flight = true;
        let job = feed.job();
        let (client, results, name) = (
            self.http.clone(),
            self.feed_results.clone(),
            name.to_owned(),
        );
        tokio::spawn(async move {
            let outcome = fetch::run(&client, &job).await;
            let _ = results.send((name, outcome)).await;
        });
    }

    /// `feeds refresh [NAME]`: fetch now, answer when done.
    pub(crate) fn refresh_feeds(&mut self, name: Option<String>, reply: oneshot::Sender<Response>) {
        let targets: BTreeSet<String> = match name {
            Some(n) if !self.feeds.contains_key(&n) => {
                let _ = reply.send(Response::err(format!(
                    "no feed named `{n}` (see `api-shield feeds`)"
                )));
                return;
            }
            Some(n) => [n].into(),
            None => self.feeds.keys().cloned().collect(),
        };
        if targets.is_empty() {
            let _ = reply.send(Response::err("no feeds are configured"));
            return;
        }
        for t in &targets {
            self.start_fetch(t);
        }
        self.pending_refreshes.push(PendingRefresh {
            waiting_for: targets,
            results: BTreeMap::new(),
            reply,
        });
    }

    /// Applies a fetch's outcome: a good version replaces the one in force as a diff
    /// (adds before removes); anything else changes nothing.
    pub(crate) fn feed_outcome(&mut self, name: &str, outcome: Outcome) {
        let Some(feed) = self.feeds.get_mut(name) else {
            return;
        };
        let summary = match outcome {
            Outcome::NotModified => {
                feed.not_modified();
                log::info!(
                    "feed {name}: not modified; {} entries stay in force",
                    feed.status.entries
                );
                format!("not modified, {} entries in force", feed.status.entries)
            }
            Outcome::Failed(error) => {
                let kept = feed.status.entries;
                feed.failed(error.clone());
                log::warn!(
                    "feed {name}: fetch failed, the last good version ({kept} entries) stays in force: {error}"
                );
                format!("failed: {error}; the last good version ({kept} entries) stays in force")
            }
            Outcome::Good(good) => {
                feed.succeeded(&good);
                let entries = good.entries.clone();
                match self.change_lists(|registry| Ok(registry.set_feed(name, good.entries))) {
                    Ok((change, _)) => {
                        let feed = &self.feeds[name];
                        if let Err(e) = feed.save_good(&self.state, &entries) {
                            log::error!("feed {name}: saving the last good version: {e:#}");
                        }
                        let s = &feed.status;
                        let line = format!(
                            "{} entries in force (+{} -{}), {} lines rejected, {} host bits cleared, {} allowlisted (not blocked), {} refused (map full)",
                            s.entries,
                            change.added,
                            change.removed,
                            s.rejected_lines,
                            s.host_bits_cleared,
                            s.allowlisted,
                            s.refused_map_full
                        );
                        log::info!("feed {name}: {line}");
                        if !s.rejected_examples.is_empty() {
                            log::warn!(
                                "feed {name}: rejected lines, e.g. {}",
                                s.rejected_examples.join(" | ")
                            );
                        }
                        line
                    }
                    Err(e) => {
                        let feed = self.feeds.get_mut(name).expect("feed exists");
                        feed.failed(format!("applying: {e:#}"));
                        log::error!(
                            "feed {name}: applying the new version failed, the previous one stays: {e:#}"
                        );
                        format!("failed to apply: {e:#}")
                    }
                }
            }
        };
        let mut still_pending = Vec::new();
        for mut p in self.pending_refreshes.drain(..) {
            if p.waiting_for.remove(name) {
                p.results.insert(name.to_owned(), summary.clone());
            }
            if p.waiting_for.is_empty() {
                let failed = p.results.values().any(|r| r.starts_with("failed"));
                let text: Vec<String> =
                    p.results.iter().map(|(n, r)| format!("{n}: {r}")).collect();
                let _ = p.reply.send(if failed {
                    Response::err(text.join("; "))
                } else {
                    Response::ok(text)
                });
            } else {
                still_pending.push(p);
            }
        }
        self.pending_refreshes = still_pending;
    }

    pub(crate) fn feeds_status(&self) -> Vec<FeedStatus> {
        self.feeds.values().map(Feed::status).collect()
    }
}
