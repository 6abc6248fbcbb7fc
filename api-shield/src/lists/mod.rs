//! The allowlist and blocklist: who listed what (the registry), the fold of both lists into
//! one longest-prefix table per family, the summaries the data plane reads first, and the
//! store that keeps the list maps in step with the table.

pub mod fold;
pub mod registry;
pub mod store;
pub mod summary;

pub use self::{
    fold::{Folded, ListDiff, ListTable, fold},
    registry::{Claim, ListKind, Origin, Registry, StateDir, unix_now, until_next_whole_second},
    store::ListStore,
    summary::SummaryMaps,
};
