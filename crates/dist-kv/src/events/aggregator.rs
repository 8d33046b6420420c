//! `KVEventAggregator`: the events that every worker reported.
//!
//! With tensor or pipeline parallelism each worker's KV-cache connector reports the same logical
//! events; the scheduler publishes only those seen `num_workers` times. vLLM keeps a
//! `collections.Counter`; this keeps the same counts and the same first-seen order.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::events::types::KvCacheEvent;

/// Counts events across workers; see the module docs.
#[derive(Debug, Clone)]
pub struct KvEventAggregator {
    /// Distinct events in first-seen order, with their counts.
    entries: Vec<(KvCacheEvent, usize)>,
    /// Index into `entries` of each distinct event.
    index: HashMap<KvCacheEvent, usize>,
    num_workers: usize,
}

impl KvEventAggregator {
    /// An aggregator expecting `num_workers` (> 0) reports of each common event.
    pub fn new(num_workers: usize) -> Result<Self> {
        if num_workers == 0 {
            return Err(Error::InvalidArgument(
                "num_workers must be greater than zero".into(),
            ));
        }
        Ok(KvEventAggregator {
            entries: Vec::new(),
            index: HashMap::new(),
            num_workers,
        })
    }

    /// Adds one worker's events (each occurrence counts once).
    pub fn add_events(&mut self, events: impl IntoIterator<Item = KvCacheEvent>) {
        for ev in events {
            match self.index.get(&ev) {
                Some(&i) => self.entries[i].1 += 1,
                None => {
                    self.index.insert(ev.clone(), self.entries.len());
                    self.entries.push((ev, 1));
                }
            }
        }
    }

    /// The events seen exactly `num_workers` times, in first-seen order.
    pub fn get_common_events(&self) -> Vec<KvCacheEvent> {
        self.entries
            .iter()
            .filter(|(_, c)| *c == self.num_workers)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Every event, each repeated as often as it was seen, in first-seen order (`Counter.elements()`).
    pub fn get_all_events(&self) -> Vec<KvCacheEvent> {
        self.entries
            .iter()
            .flat_map(|(e, c)| std::iter::repeat(e).take(*c).cloned())
            .collect()
    }

    /// Forgets every event (the worker count stays).
    pub fn clear_events(&mut self) {
        self.entries.clear();
        self.index.clear();
    }

    /// Adds `count` (> 0) workers.
    pub fn increment_workers(&mut self, count: usize) -> Result<()> {
        if count == 0 {
            return Err(Error::InvalidArgument("count must be positive".into()));
        }
        self.num_workers += count;
        Ok(())
    }

    /// Sets the worker count back to 1.
    pub fn reset_workers(&mut self) {
        self.num_workers = 1;
    }

    /// The worker count.
    pub fn get_number_of_workers(&self) -> usize {
        self.num_workers
    }
}

/// vLLM's `KVConnectorKVEvents`: the container a KV connector reports its events in.
pub trait KvConnectorKvEvents {
    /// Adds one worker's events.
    fn add_events(&mut self, events: Vec<KvCacheEvent>);
    /// Reduces the container to the events every worker reported.
    fn aggregate(&mut self);
    /// Adds `count` workers.
    fn increment_workers(&mut self, count: usize) -> Result<()>;
    /// Every event held.
    fn get_all_events(&self) -> Vec<KvCacheEvent>;
    /// The worker count.
    fn get_number_of_workers(&self) -> usize;
    /// Forgets every event.
    fn clear_events(&mut self);
    /// Adds all of `other`'s events to `self`.
    fn merge(&mut self, other: &dyn KvConnectorKvEvents) {
        self.add_events(other.get_all_events());
    }
}

impl KvConnectorKvEvents for KvEventAggregator {
    fn add_events(&mut self, events: Vec<KvCacheEvent>) {
        KvEventAggregator::add_events(self, events);
    }

    fn aggregate(&mut self) {
        let common = self.get_common_events();
        self.clear_events();
        for _ in 0..self.num_workers {
            KvEventAggregator::add_events(self, common.iter().cloned());
        }
    }

    fn increment_workers(&mut self, count: usize) -> Result<()> {
        KvEventAggregator::increment_workers(self, count)
    }

    fn get_all_events(&self) -> Vec<KvCacheEvent> {
        KvEventAggregator::get_all_events(self)
    }

    fn get_number_of_workers(&self) -> usize {
        self.num_workers
    }

    fn clear_events(&mut self) {
        KvEventAggregator::clear_events(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::types::{BlockHash, BlockRemoved};

    fn removed(h: u64) -> KvCacheEvent {
        KvCacheEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![BlockHash::from(h)],
            medium: Some("GPU".into()),
            group_idx: None,
        })
    }

    #[test]
    fn common_events_are_those_every_worker_saw() {
        let mut a = KvEventAggregator::new(2).unwrap();
        a.add_events(vec![removed(1), removed(2), KvCacheEvent::AllBlocksCleared]);
        a.add_events(vec![removed(2), removed(1)]);
        assert_eq!(a.get_common_events(), vec![removed(1), removed(2)]);
        assert_eq!(
            a.get_all_events(),
            vec![
                removed(1),
                removed(1),
                removed(2),
                removed(2),
                KvCacheEvent::AllBlocksCleared
            ]
        );
        a.increment_workers(1).unwrap();
        assert!(a.get_common_events().is_empty());
        assert!(a.increment_workers(0).is_err());
        a.reset_workers();
        assert_eq!(a.get_number_of_workers(), 1);
        assert_eq!(a.get_common_events(), vec![KvCacheEvent::AllBlocksCleared]);
        a.clear_events();
        assert!(a.get_all_events().is_empty());
        assert!(KvEventAggregator::new(0).is_err());
    }

    #[test]
    fn aggregate_and_merge() {
        let mut a = KvEventAggregator::new(2).unwrap();
        a.add_events(vec![removed(1), removed(2)]);
        a.add_events(vec![removed(1)]);
        KvConnectorKvEvents::aggregate(&mut a);
        assert_eq!(
            KvConnectorKvEvents::get_all_events(&a),
            vec![removed(1), removed(1)]
        );
        let mut b = KvEventAggregator::new(1).unwrap();
        b.merge(&a);
        assert_eq!(b.get_all_events().len(), 2);
    }
}
