//! The in-process store: the same rules as the Redis scripts, over a map.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Claim, JobKey, Store, StoreError, WamidRecord};
use crate::event::DeadReason;
use crate::ids::Wamid;

#[derive(Debug, Clone)]
enum Record {
    Claimed { owner: String, at: DateTime<Utc> },
    Ambiguous { at: DateTime<Utc> },
    Sent(Wamid),
    Dead,
}

/// The in-process store (no expiry: it lives as long as the process).
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<HashMap<JobKey, Record>>,
    wamids: Mutex<HashMap<Wamid, WamidRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        retake_ambiguous: bool,
    ) -> Result<Claim, StoreError> {
        let mut jobs = self.jobs.lock().expect("store lock");
        let claimed = Record::Claimed {
            owner: owner.to_owned(),
            at: now,
        };
        let ambiguous_since = match jobs.get(key) {
            None => {
                jobs.insert(key.clone(), claimed);
                return Ok(Claim::Fresh);
            }
            Some(Record::Sent(wamid)) => return Ok(Claim::Sent(wamid.clone())),
            Some(Record::Dead) => return Ok(Claim::Dead),
            Some(Record::Claimed { at, .. })
                if now.signed_duration_since(*at).to_std().unwrap_or_default() < lease =>
            {
                return Ok(Claim::Busy);
            }
            Some(Record::Claimed { at, .. } | Record::Ambiguous { at }) => *at,
        };
        if retake_ambiguous {
            jobs.insert(key.clone(), claimed);
            Ok(Claim::Fresh)
        } else {
            jobs.insert(
                key.clone(),
                Record::Ambiguous {
                    at: ambiguous_since,
                },
            );
            Ok(Claim::Ambiguous(ambiguous_since))
        }
    }

    async fn mark_sent(
        &self,
        key: &JobKey,
        wamid: &Wamid,
        record: &WamidRecord,
    ) -> Result<(), StoreError> {
        self.jobs
            .lock()
            .expect("store lock")
            .insert(key.clone(), Record::Sent(wamid.clone()));
        self.wamids
            .lock()
            .expect("store lock")
            .insert(wamid.clone(), record.clone());
        Ok(())
    }

    async fn mark_ambiguous(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock().expect("store lock");
        if matches!(jobs.get(key), Some(Record::Claimed { owner: o, .. }) if o == owner) {
            jobs.insert(key.clone(), Record::Ambiguous { at: now });
        }
        Ok(())
    }

    async fn release(&self, key: &JobKey, owner: &str) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock().expect("store lock");
        if matches!(jobs.get(key), Some(Record::Claimed { owner: o, .. }) if o == owner) {
            jobs.remove(key);
        }
        Ok(())
    }

    async fn mark_dead(&self, key: &JobKey, _reason: DeadReason) -> Result<(), StoreError> {
        self.jobs
            .lock()
            .expect("store lock")
            .insert(key.clone(), Record::Dead);
        Ok(())
    }

    async fn wamid(&self, wamid: &Wamid) -> Result<Option<WamidRecord>, StoreError> {
        Ok(self.wamids.lock().expect("store lock").get(wamid).cloned())
    }
}
