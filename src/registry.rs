//! The template registry: definitions synced from the management API
//! (`GET /{waba_id}/message_templates`, paged) into the store by one replica at a time, and
//! read from the store into every replica's memory for the local parameter check. Statuses are
//! read by admission from the store itself, where status webhooks update them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use secrecy::SecretString;
use tracing::{info, warn};

use crate::cloud::{CloudApi, ManagementError};
use crate::ids::WabaId;
use crate::policy::template::TemplateDefinition;
use crate::store::{Store, StoreError};

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The management API refused or could not be reached.
    #[error("listing templates of WABA {waba} failed: {source}")]
    Cloud {
        /// The WABA.
        waba: WabaId,
        /// The cause.
        source: ManagementError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Key = (String, String);

/// Every replica's copy of the definitions, by portfolio, name and language.
#[derive(Default)]
pub struct Registry {
    local: RwLock<HashMap<WabaId, HashMap<Key, Arc<TemplateDefinition>>>>,
}

/// More pages than this means something is wrong (Meta caps a WABA at a few thousand templates).
const MAX_PAGES: usize = 200;

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The definition of `name` in `language`, if this replica has it.
    pub fn get(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
    ) -> Option<Arc<TemplateDefinition>> {
        let local = self.local.read().expect("registry lock");
        local
            .get(waba)?
            .get(&(name.to_owned(), language.to_owned()))
            .cloned()
    }

    /// Reads the portfolios' registries from the store into memory.
    pub async fn load(&self, store: &dyn Store, wabas: &[WabaId]) -> Result<usize, StoreError> {
        let mut loaded = HashMap::new();
        for waba in wabas {
            let templates = store.templates(waba).await?;
            let by_key = templates
                .into_iter()
                .map(|t| ((t.name.clone(), t.language.clone()), Arc::new(t)))
                .collect::<HashMap<_, _>>();
            loaded.insert(waba.clone(), by_key);
        }
        let count = loaded.values().map(HashMap::len).sum();
        *self.local.write().expect("registry lock") = loaded;
        Ok(count)
    }

    /// Fetches every page of each portfolio's templates and replaces its registry in the store.
    pub async fn sync(
        cloud: &dyn CloudApi,
        store: &dyn Store,
        wabas: &BTreeMap<WabaId, SecretString>,
    ) -> Result<usize, SyncError> {
        let mut total = 0;
        for (waba, token) in wabas {
            let mut templates = Vec::new();
            let mut after: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let page = cloud
                    .templates(waba, token, after.as_deref())
                    .await
                    .map_err(|source| SyncError::Cloud {
                        waba: waba.clone(),
                        source,
                    })?;
                templates.extend(page.templates);
                after = page.after;
                if after.is_none() {
                    break;
                }
            }
            total += templates.len();
            store.put_templates(waba, &templates, Utc::now()).await?;
            info!(%waba, templates = templates.len(), "template registry synced");
        }
        Ok(total)
    }

    /// Syncs if this replica wins the sync lock for `refresh`, then loads. Errors are logged:
    /// a failed sync keeps the registry as it was (jobs wait for a first sync, never guess).
    /// `false` when this replica's sync failed, so the caller tries again soon rather than a
    /// whole refresh period later.
    pub async fn refresh(
        &self,
        cloud: &dyn CloudApi,
        store: &dyn Store,
        wabas: &BTreeMap<WabaId, SecretString>,
        owner: &str,
        refresh: Duration,
    ) -> bool {
        let mut synced = true;
        match store.try_lock("templates-sync", owner, refresh).await {
            Ok(true) => {
                if let Err(e) = Self::sync(cloud, store, wabas).await {
                    warn!(error = %e, "template registry sync failed; keeping the registry as it was");
                    synced = false;
                    // Let the next try (here or on another replica) take the lock.
                    if let Err(e) = store.unlock("templates-sync", owner).await {
                        warn!(error = %e, "could not release the template sync lock");
                    }
                }
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not take the template sync lock"),
        }
        let keys: Vec<WabaId> = wabas.keys().cloned().collect();
        if let Err(e) = self.load(store, &keys).await {
            warn!(error = %e, "could not load the template registry");
        }
        synced
    }
}
