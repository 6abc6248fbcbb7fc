//! SIGHUP: the config read again and applied as a diff, or refused with nothing changed.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use super::Controller;
use crate::{config::Config, feeds::Feed};

impl Controller {
    /// Reads the config file again; applies it as a diff or changes nothing.
    pub(crate) fn reload(&mut self) -> Result<()> {
        log::info!("reloading config");
        let result = self.try_reload();
        match &result {
            Ok(()) => log::info!("reloaded config"),
            Err(e) => log::error!("reload refused, the previous config stays in force: {e:#}"),
        }
        result
    }

    pub(crate) fn try_reload(&mut self) -> Result<()> {
        let Some(path) = self.config_path.clone() else {
            bail!("running the built-in default config (no --config): nothing to reload");
        };
        let mut next = Config::from_file(&path)
            .with_context(|| format!("invalid config {}", path.display()))?;
        self.overrides.apply(&mut next);
        for (what, changed) in [
            ("capacity", next.capacity != self.config.capacity),
            ("interfaces", next.interfaces != self.config.interfaces),
            ("admin", next.admin != self.config.admin),
            ("state_dir", next.state_dir != self.config.state_dir),
            ("pin_dir", next.pin_dir != self.config.pin_dir),
        ] {
            if changed {
                bail!(
                    "{what} changed: that takes a restart of api-shield (which keeps enforcing meanwhile)"
                );
            }
        }
        // Feeds no longer configured let go of their entries; new ones start from their
        // last good version (if an earlier run saved one) and are fetched soon.
        let mut new_feeds = Vec::new();
        let mut saved_versions = Vec::new();
        for fc in &next.feeds {
            if !self.feeds.contains_key(&fc.name.0) {
                let mut feed = Feed::new(fc.clone());
                if let Ok(Some(entries)) = feed.load_good(&self.state) {
                    saved_versions.push((fc.name.0.clone(), entries));
                }
                new_feeds.push(feed);
            }
        }
        let old = self.config.clone();
        let applied = self
            .instances
            .iter_mut()
            .try_for_each(|i| i.shield.apply_settings(&next));
        let changed = applied.and_then(|()| {
            self.change_lists(|registry| {
                registry.set_config(&next.allowlist, &next.blocklist);
                registry.retain_feeds(|name| next.feeds.iter().any(|f| f.name.0 == name));
                for (name, entries) in saved_versions {
                    registry.set_feed(&name, entries);
                }
                Ok(())
            })
        });
        if let Err(e) = changed {
            // The lists are back already; the limits and settings go back too.
            let _ = self
                .instances
                .iter_mut()
                .try_for_each(|i| i.shield.apply_settings(&old));
            return Err(e);
        }
        for net in self.registry.fold().shadowed {
            log::warn!(
                "blocklist entry {net} lies inside an allowlisted prefix: the allowlist wins"
            );
        }
        self.feeds
            .retain(|name, _| next.feeds.iter().any(|f| &f.name.0 == name));
        for feed in new_feeds {
            self.feeds.insert(feed.config.name.0.clone(), feed);
        }
        // A limit slot that now belongs to another rule starts its counters from zero.
        let (old_names, new_names) = (self.config.limits.slot_names(), next.limits.slot_names());
        for (slot, name) in new_names.iter().enumerate() {
            if old_names.get(slot) != Some(name) {
                for inst in &mut self.instances {
                    if let Err(e) = inst.shield.reset_rule_counter(slot as u32) {
                        log::warn!(
                            "{}: resetting counters of rule {name}: {e:#}",
                            inst.interface
                        );
                    }
                }
            }
        }
        *self.slot_names.write().expect("slot names lock") = new_names;
        for fc in &next.feeds {
            if let Some(feed) = self.feeds.get_mut(&fc.name.0)
                && feed.config != *fc
            {
                // A changed source or format: fetch it anew, unconditionally.
                let source_changed = feed.config.url != fc.url
                    || feed.config.path != fc.path
                    || feed.config.format != fc.format;
                feed.config = fc.clone();
                if source_changed {
                    feed.etag = None;
                    feed.last_modified = None;
                    feed.next_refresh = Instant::now();
                }
            }
        }
        self.config = next;
        Ok(())
    }
}
