//! One conformance suite, two stores: the in-memory store must behave exactly like Redis.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use wa_sender::event::DeadReason;
use wa_sender::ids::{JobId, WabaId, Wamid};
use wa_sender::store::memory::MemoryStore;
use wa_sender::store::redis::RedisStore;
use wa_sender::store::{Claim, JobKey, Store, WamidRecord};

fn key(id: &str) -> JobKey {
    JobKey {
        waba: WabaId::parse("102290129340398").unwrap(),
        job_id: JobId::parse(id).unwrap(),
    }
}

async fn conformance(store: Arc<dyn Store>) {
    let lease = Duration::from_secs(60);
    let now = Utc::now();

    // A fresh job is claimed once; a second claimant is told it is busy.
    assert_eq!(
        store
            .claim(&key("a"), "w1", now, lease, false)
            .await
            .unwrap(),
        Claim::Fresh
    );
    assert_eq!(
        store
            .claim(&key("a"), "w2", now, lease, false)
            .await
            .unwrap(),
        Claim::Busy
    );

    // Once sent, it is never claimable again, and its wamid finds the job.
    let wamid = Wamid::parse("wamid.HBgL1").unwrap();
    let record = WamidRecord {
        job_id: "a".into(),
        campaign_id: Some("c".into()),
        traceparent: None,
    };
    store.mark_sent(&key("a"), &wamid, &record).await.unwrap();
    assert_eq!(
        store
            .claim(&key("a"), "w2", now, lease, true)
            .await
            .unwrap(),
        Claim::Sent(wamid.clone())
    );
    assert_eq!(store.wamid(&wamid).await.unwrap(), Some(record));
    assert_eq!(
        store
            .wamid(&Wamid::parse("wamid.unknown").unwrap())
            .await
            .unwrap(),
        None
    );

    // Releasing lets a retry claim it; only the owner can release.
    assert_eq!(
        store
            .claim(&key("b"), "w1", now, lease, false)
            .await
            .unwrap(),
        Claim::Fresh
    );
    store.release(&key("b"), "w2").await.unwrap();
    assert_eq!(
        store
            .claim(&key("b"), "w2", now, lease, false)
            .await
            .unwrap(),
        Claim::Busy
    );
    store.release(&key("b"), "w1").await.unwrap();
    assert_eq!(
        store
            .claim(&key("b"), "w2", now, lease, false)
            .await
            .unwrap(),
        Claim::Fresh
    );

    // A claim older than the lease means its owner died mid-send: ambiguous, unless retaken.
    let later = now + chrono::Duration::seconds(61);
    assert_eq!(
        store
            .claim(&key("c"), "w1", now, lease, false)
            .await
            .unwrap(),
        Claim::Fresh
    );
    let since = match store
        .claim(&key("c"), "w2", later, lease, false)
        .await
        .unwrap()
    {
        Claim::Ambiguous(since) => since,
        other => panic!("expected ambiguous, got {other:?}"),
    };
    assert_eq!(since.timestamp_millis(), now.timestamp_millis());
    assert_eq!(
        store
            .claim(&key("c"), "w2", later, lease, true)
            .await
            .unwrap(),
        Claim::Fresh
    );

    // An explicitly ambiguous send stays ambiguous for at-most-once claimants.
    assert_eq!(
        store
            .claim(&key("d"), "w1", now, lease, false)
            .await
            .unwrap(),
        Claim::Fresh
    );
    store.mark_ambiguous(&key("d"), "w1", now).await.unwrap();
    assert!(matches!(
        store
            .claim(&key("d"), "w2", now, lease, false)
            .await
            .unwrap(),
        Claim::Ambiguous(_)
    ));

    // Dead letters are remembered.
    store
        .mark_dead(&key("e"), DeadReason::Expired)
        .await
        .unwrap();
    assert_eq!(
        store
            .claim(&key("e"), "w1", now, lease, true)
            .await
            .unwrap(),
        Claim::Dead
    );
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let prefix = format!("t-store-{}", uuid::Uuid::new_v4().simple());
    let store = match RedisStore::connect("redis://127.0.0.1:6379/0", &prefix).await {
        Ok(s) => s,
        Err(e) => panic!("integration tests need Redis: {e}"),
    };
    conformance(Arc::new(store.clone())).await;
    store.delete_all().await.unwrap();
}
