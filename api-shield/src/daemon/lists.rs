//! The lists as the daemon changes them: every change (CLI, feeds, penalties, expiry,
//! reload) goes through [`Controller::change_lists`], which brings every instance's maps in
//! step or, failing, puts the registry and the maps back as they were.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use api_shield_common::names;
use ipnet::IpNet;

use super::Controller;
use crate::lists::{Folded, Registry};

impl Controller {
    /// Changes the registry with `change` and takes every instance's maps to it. If the
    /// change or the maps fail, the registry and the maps go back to what they held, so a
    /// failed change changes nothing; the error says why.
    pub(crate) fn change_lists<T>(
        &mut self,
        change: impl FnOnce(&mut Registry) -> Result<T>,
    ) -> Result<(T, Folded)> {
        let before = self.registry.clone();
        let result = change(&mut self.registry).and_then(|value| Ok((value, self.sync()?)));
        if result.is_err() {
            self.registry = before;
            if let Err(e) = self.sync() {
                log::error!("putting the lists back after a failed change: {e:#}");
            }
        }
        result
    }

    /// Makes every instance's lists match the registry (adds before removes).
    pub(crate) fn sync(&mut self) -> Result<Folded> {
        let folded = self.registry.fold();
        let mut refused = BTreeSet::new();
        for inst in &mut self.instances {
            let refused_here = inst
                .shield
                .apply_lists(&folded.table)
                .with_context(|| format!("updating the lists of {}", inst.interface))?;
            refused.extend(refused_here);
        }
        if refused.len() != self.refused.len() && !refused.is_empty() {
            log::error!(
                "{} list entries refused: the list maps are full (raise capacity); retried on every update",
                refused.len()
            );
        }
        self.refused = refused.into_iter().collect();
        for net in &self.refused {
            let map = if matches!(net, IpNet::V4(_)) {
                names::MAP_LIST_V4
            } else {
                names::MAP_LIST_V6
            };
            *self.update_failures.entry(map).or_insert(0) += 1;
        }
        // What each feed lost to the allowlist and to full maps, for `feeds` and metrics.
        for (name, feed) in &mut self.feeds {
            let set = self.registry.feed(name);
            let count =
                |nets: &[IpNet]| set.map_or(0, |s| nets.iter().filter(|n| s.contains(n)).count());
            feed.status.allowlisted = count(&folded.shadowed);
            feed.status.refused_map_full = count(&self.refused);
        }
        Ok(folded)
    }

    /// Persists CLI entries; a failure is reported but enforcement goes on.
    pub(crate) fn persist(&self) -> Option<String> {
        self.state.save_entries(&self.registry).err().map(|e| {
            log::error!("state directory: {e:#}");
            format!("enforced, but not saved to the state directory: {e:#}")
        })
    }
}
