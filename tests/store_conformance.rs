//! One conformance suite, three stores: the in-memory store must answer exactly like Redis, rule
//! by rule, and keep the same records; and so must a Redis Cluster (every request's keys in one
//! hash slot, or the cluster refuses it: CROSSSLOT).

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use wa_sender::event::DeadReason;
use wa_sender::ids::{CampaignId, JobId, PhoneNumberId, WaId, WabaId, Wamid};
use wa_sender::job::Category;
use wa_sender::policy::admission::{
    CampaignState, Consent, DeadWhy, DeferReason, JobState, Mark, OptInPolicy, PairRate, Request,
    TemplateUse, Verdict,
};
use wa_sender::policy::template::TemplateDefinition;
use wa_sender::store::memory::MemoryStore;
use wa_sender::store::redis::{Deployment, RedisStore};
use wa_sender::store::{
    Booked, Cost, Deferral, Heartbeat, JobKey, Message, Report, SlotAsk, Store, Subject, Tally,
    WamidRecord,
};

const WABA: &str = "102290129340398";
const NUMBER: &str = "106540352242922";

fn waba() -> WabaId {
    WabaId::parse(WABA).unwrap()
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

fn secs(s: i64) -> TimeDelta {
    TimeDelta::seconds(s)
}

fn key(id: &str) -> JobKey {
    JobKey {
        waba: waba(),
        job_id: JobId::parse(id).unwrap(),
    }
}

/// A job `id` to `to`: a template (`Some(name)`) or a free-form text (`None`).
fn subject(id: &str, to: &str, template: Option<&str>) -> Subject {
    Subject {
        job: key(id),
        number: PhoneNumberId::parse(NUMBER).unwrap(),
        to: WaId::parse(to).unwrap(),
        campaign: None,
        template: template.map(|t| (t.to_owned(), "en_US".to_owned())),
    }
}

fn request(now: DateTime<Utc>, template: bool) -> Request {
    Request {
        owner: "w1".into(),
        now,
        lease: Duration::from_secs(60),
        retake_ambiguous: false,
        expires_at: None,
        not_before: None,
        free_form: !template,
        template: template.then_some(TemplateUse {
            fallback: false,
            params: None,
        }),
        opt_in: OptInPolicy {
            marketing: true,
            utility: true,
            authentication: false,
        },
        tier_limit: None,
        pair: PairRate {
            margin: Duration::ZERO,
            period: Duration::from_secs(6),
            burst: 3,
        },
        campaign_recheck: Duration::from_secs(60),
        template_recheck: Duration::from_secs(600),
    }
}

fn definition(name: &str, status: &str, category: &str) -> TemplateDefinition {
    serde_json::from_value(serde_json::json!({
        "name": name, "language": "en_US", "status": status, "category": category,
        "components": [{"type": "BODY", "text": "Hi {{1}}"}]
    }))
    .unwrap()
}

fn mark(at: DateTime<Utc>, source: &str) -> Mark {
    Mark {
        at,
        source: source.into(),
    }
}

async fn admit(store: &dyn Store, subject: &Subject, req: &Request) -> Verdict {
    store.admit(subject, req).await.unwrap()
}

fn dead_reason(v: &Verdict) -> Option<DeadReason> {
    match v {
        Verdict::Dead(why) => Some(why.reason()),
        _ => None,
    }
}

/// Claims, redeliveries, stale claims and dead letters.
async fn idempotency(store: &dyn Store) {
    let t = now();
    let to = "4915100000001";
    store
        .record_inbound(
            &waba(),
            &subject("x", to, None).number,
            &WaId::parse(to).unwrap(),
            t - secs(60),
        )
        .await
        .unwrap();
    let text = |id: &str| subject(id, to, None);
    let req = request(t, false);
    let mut other = req.clone();
    other.owner = "w2".into();

    // A fresh job is admitted once; a second claimant waits.
    assert_eq!(
        admit(store, &text("a"), &req).await,
        Verdict::Send { fallback: false }
    );
    assert!(matches!(
        admit(store, &text("a"), &other).await,
        Verdict::Defer {
            why: DeferReason::ClaimedElsewhere,
            ..
        }
    ));
    // Once sent, never again, and its wamid finds the job.
    let wamid = Wamid::parse("wamid.HBgL1").unwrap();
    let record = WamidRecord {
        job_id: "a".into(),
        campaign_id: Some("c".into()),
        traceparent: None,
        metadata: serde_json::json!({"order": 7}),
        resend: None,
    };
    store.mark_sent(&key("a"), &wamid, &record).await.unwrap();
    let mut retake = other.clone();
    retake.retake_ambiguous = true;
    assert_eq!(
        admit(store, &text("a"), &retake).await,
        Verdict::AlreadySent(wamid.clone())
    );
    // Reopened (Meta failed it after accepting it, 131049) only for that wamid; then admitted.
    let other_wamid = Wamid::parse("wamid.HBgL2").unwrap();
    assert!(!store.reopen(&key("a"), &other_wamid).await.unwrap());
    assert!(store.reopen(&key("a"), &wamid).await.unwrap());
    let mut again = retake.clone();
    again.now = t + secs(7); // past the pair period
    assert_eq!(
        admit(store, &text("a"), &again).await,
        Verdict::Send { fallback: false }
    );
    store.mark_sent(&key("a"), &wamid, &record).await.unwrap();
    assert_eq!(
        store.message(&waba(), &wamid).await.unwrap().record,
        Some(record)
    );
    assert_eq!(
        store
            .message(&waba(), &Wamid::parse("wamid.unknown").unwrap())
            .await
            .unwrap(),
        Message::default()
    );

    // Only the owner releases; a released job is admitted again.
    let mut later = req.clone();
    later.now = t + secs(7); // past the pair period
    assert_eq!(
        admit(store, &text("b"), &later).await,
        Verdict::Send { fallback: false }
    );
    store.release(&key("b"), "w2").await.unwrap();
    let mut later_other = other.clone();
    later_other.now = later.now + secs(7);
    assert!(matches!(
        admit(store, &text("b"), &later_other).await,
        Verdict::Defer { .. }
    ));
    store.release(&key("b"), "w1").await.unwrap();
    later_other.now = later.now + secs(14);
    assert_eq!(
        admit(store, &text("b"), &later_other).await,
        Verdict::Send { fallback: false }
    );

    // A claim older than the lease: its owner died mid-send. At-most-once waits (ambiguous),
    // at-least-once retakes it.
    let mut stale = other.clone();
    stale.now = later_other.now + secs(61);
    assert_eq!(
        admit(store, &text("b"), &stale).await,
        Verdict::Ambiguous(later_other.now)
    );
    let mut stale_retake = stale.clone();
    stale_retake.retake_ambiguous = true;
    assert_eq!(
        admit(store, &text("b"), &stale_retake).await,
        Verdict::Send { fallback: false }
    );

    // An explicitly ambiguous send stays ambiguous for at-most-once claimants.
    store
        .mark_ambiguous(&key("b"), "w2", stale.now)
        .await
        .unwrap();
    let mut after = stale.clone();
    after.now = stale.now + secs(1);
    assert_eq!(
        admit(store, &text("b"), &after).await,
        Verdict::Ambiguous(stale.now)
    );

    // Dead letters are remembered, before any other rule.
    store
        .mark_dead(&key("e"), DeadReason::Expired, None)
        .await
        .unwrap();
    let mut expired = retake.clone();
    expired.expires_at = Some(t - secs(1));
    assert_eq!(
        admit(store, &text("e"), &expired).await,
        Verdict::AlreadyDead
    );

    // Each record reads back as what it says.
    assert_eq!(store.job(&key("e")).await.unwrap(), Some(JobState::Dead));
    assert_eq!(
        store.job(&key("a")).await.unwrap(),
        Some(JobState::Sent(wamid.clone()))
    );
    assert_eq!(
        store.job(&key("b")).await.unwrap(),
        Some(JobState::Ambiguous { at: stale.now })
    );
    assert_eq!(store.job(&key("never")).await.unwrap(), None);

    // An operator's replay reopens a dead job only: a sent one keeps its record.
    assert!(!store.reopen_dead(&key("a")).await.unwrap());
    assert_eq!(
        store.job(&key("a")).await.unwrap(),
        Some(JobState::Sent(wamid.clone()))
    );
    assert!(!store.reopen_dead(&key("never")).await.unwrap());
    assert!(store.reopen_dead(&key("e")).await.unwrap());
    assert_eq!(store.job(&key("e")).await.unwrap(), None);
    let mut replayed = after.clone();
    replayed.now = after.now + secs(10); // past the pair period
    assert_eq!(
        admit(store, &text("e"), &replayed).await,
        Verdict::Send { fallback: false }
    );
    assert!(matches!(
        store.job(&key("e")).await.unwrap(),
        Some(JobState::Claimed { owner, .. }) if owner == replayed.owner
    ));
}

/// Each admission rule, with the exact verdict.
async fn rules(store: &dyn Store) {
    let t = now();
    let w = waba();
    store
        .put_templates(
            &w,
            &[
                definition("order_update", "APPROVED", "UTILITY"),
                definition("spring_sale", "APPROVED", "MARKETING"),
                definition("otp_code", "APPROVED", "AUTHENTICATION"),
                definition("old_promo", "REJECTED", "MARKETING"),
                definition("low_quality", "PAUSED", "MARKETING"),
            ],
            t,
        )
        .await
        .unwrap();
    let users = ["4915100000010", "4915100000011", "4915100000012"];
    let [opted_in, opted_out, stranger] = users.map(|u| WaId::parse(u).unwrap());
    store
        .record_opt_ins(
            &w,
            &[
                (opted_in.clone(), mark(t - secs(99), "csv")),
                (opted_out.clone(), mark(t - secs(99), "csv")),
            ],
        )
        .await
        .unwrap();
    store
        .record_opt_out(&w, &opted_out, Some(mark(t - secs(5), "131050")))
        .await
        .unwrap();
    let campaign = |id: &str| CampaignId::parse(id).unwrap();
    store
        .set_campaign(&w, &campaign("paused"), CampaignState::Paused)
        .await
        .unwrap();
    store
        .set_campaign(&w, &campaign("gone"), CampaignState::Cancelled)
        .await
        .unwrap();

    let tpl = |id: &str, to: &WaId, name: &str| subject(id, to.as_str(), Some(name));
    let req = request(t, true);
    let cases: Vec<(&str, Subject, Request, Verdict)> = vec![
        (
            "utility to an opted-in user",
            tpl("r1", &opted_in, "order_update"),
            req.clone(),
            Verdict::Send { fallback: false },
        ),
        (
            "expired",
            tpl("r2", &opted_in, "order_update"),
            Request {
                expires_at: Some(t - secs(1)),
                ..req.clone()
            },
            Verdict::Dead(DeadWhy::Expired(t - secs(1))),
        ),
        (
            "not before",
            tpl("r3", &opted_in, "order_update"),
            Request {
                not_before: Some(t + secs(30)),
                ..req.clone()
            },
            Verdict::Defer {
                until: t + secs(30),
                why: DeferReason::NotBefore,
            },
        ),
        (
            "paused campaign",
            Subject {
                campaign: Some(campaign("paused")),
                ..tpl("r4", &opted_in, "order_update")
            },
            req.clone(),
            Verdict::Defer {
                until: t + secs(60),
                why: DeferReason::CampaignPaused,
            },
        ),
        (
            "cancelled campaign",
            Subject {
                campaign: Some(campaign("gone")),
                ..tpl("r5", &opted_in, "order_update")
            },
            req.clone(),
            Verdict::Dead(DeadWhy::CampaignCancelled),
        ),
        (
            "free-form, no window",
            subject("r6", stranger.as_str(), None),
            request(t, false),
            Verdict::Dead(DeadWhy::OutsideCareWindow { last_inbound: None }),
        ),
        (
            "free-form, fallback",
            subject("r7", opted_in.as_str(), Some("order_update")),
            Request {
                template: Some(TemplateUse {
                    fallback: true,
                    params: None,
                }),
                ..request(t, false)
            },
            Verdict::Send { fallback: true },
        ),
        (
            "unknown template",
            tpl("r8", &opted_in, "nope"),
            req.clone(),
            Verdict::Dead(DeadWhy::TemplateUnknown),
        ),
        (
            "rejected template",
            tpl("r9", &opted_in, "old_promo"),
            req.clone(),
            Verdict::Dead(DeadWhy::TemplateNotApproved {
                status: "REJECTED".into(),
            }),
        ),
        (
            "paused template",
            tpl("r10", &opted_in, "low_quality"),
            req.clone(),
            Verdict::Defer {
                until: t + secs(600),
                why: DeferReason::TemplatePaused,
            },
        ),
        (
            "bad parameters",
            tpl("r11", &opted_in, "spring_sale"),
            Request {
                template: Some(TemplateUse {
                    fallback: false,
                    params: Some("body takes 1".into()),
                }),
                ..req.clone()
            },
            Verdict::Dead(DeadWhy::TemplateParams("body takes 1".into())),
        ),
        (
            "marketing to an opted-out user",
            tpl("r12", &opted_out, "spring_sale"),
            req.clone(),
            Verdict::Dead(DeadWhy::OptedOut(mark(t - secs(5), "131050"))),
        ),
        (
            "utility to an opted-out user",
            tpl("r13", &opted_out, "order_update"),
            req.clone(),
            Verdict::Send { fallback: false },
        ),
        (
            "no opt-in",
            tpl("r14", &stranger, "spring_sale"),
            req.clone(),
            Verdict::Dead(DeadWhy::NoOptIn(Category::Marketing)),
        ),
        (
            "authentication needs none here",
            tpl("r15", &stranger, "otp_code"),
            req.clone(),
            Verdict::Send { fallback: false },
        ),
    ];
    for (name, subject, req, expected) in cases {
        assert_eq!(admit(store, &subject, &req).await, expected, "{name}");
    }
    // A template status webhook pauses a template: its jobs wait.
    store
        .set_template_status(&w, "spring_sale", "en_US", "PAUSED")
        .await
        .unwrap();
    let v = admit(store, &tpl("r16", &opted_in, "spring_sale"), &req).await;
    assert!(
        matches!(
            v,
            Verdict::Defer {
                why: DeferReason::TemplatePaused,
                ..
            }
        ),
        "{v:?}"
    );
    // The registry keeps the definitions and the status in force.
    let names: Vec<(String, String)> = store
        .templates(&w)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.status))
        .collect();
    assert!(
        names.contains(&("spring_sale".into(), "PAUSED".into())),
        "{names:?}"
    );
    assert_eq!(names.len(), 5);
    // A resync replaces the registry.
    approve_only_order_update(store, t).await;
    assert_eq!(store.templates(&w).await.unwrap().len(), 1);
    assert_eq!(
        dead_reason(&admit(store, &tpl("r17", &opted_in, "spring_sale"), &req).await),
        Some(DeadReason::TemplateNotApproved)
    );
}

/// Registry never synced: template jobs wait rather than guess.
async fn unsynced_registry(store: &dyn Store) {
    let to = WaId::parse("4915100000020").unwrap();
    let v = admit(
        store,
        &subject("u1", to.as_str(), Some("order_update")),
        &request(now(), true),
    )
    .await;
    assert!(
        matches!(
            v,
            Verdict::Defer {
                why: DeferReason::RegistryNotSynced,
                ..
            }
        ),
        "{v:?}"
    );
}

/// The pair rate bursts then borrows; the tier counts unique users outside the window.
async fn limits(store: &dyn Store) {
    let t = now();
    let w = waba();
    approve_only_order_update(store, t).await;
    let to = WaId::parse("4915100000030").unwrap();
    store
        .record_opt_ins(&w, &[(to.clone(), mark(t, "admin"))])
        .await
        .unwrap();
    let mut sent = Vec::new();
    for s in 0..25 {
        let mut req = request(t + secs(s), true);
        req.tier_limit = Some(10);
        let job = format!("p{s}");
        match admit(
            store,
            &subject(&job, to.as_str(), Some("order_update")),
            &req,
        )
        .await
        {
            Verdict::Send { .. } => sent.push(s),
            Verdict::Defer {
                why: DeferReason::PairRate,
                ..
            } => {}
            other => panic!("second {s}: {other:?}"),
        }
    }
    assert_eq!(sent, [0, 1, 2, 18, 19, 20]);

    // Tier of 2: two new users pass, the third waits until the oldest leaves the 24 h window;
    // a user already counted still passes; users inside their care window do not count.
    let users: Vec<WaId> = (40..44)
        .map(|i| WaId::parse(format!("49151000000{i}")).unwrap())
        .collect();
    let opt_ins: Vec<(WaId, Mark)> = users
        .iter()
        .map(|u| (u.clone(), mark(t, "admin")))
        .collect();
    store.record_opt_ins(&w, &opt_ins).await.unwrap();
    let number = PhoneNumberId::parse(NUMBER).unwrap();
    store
        .record_inbound(&w, &number, &users[3], t - secs(10))
        .await
        .unwrap();
    let mut req = request(t, true);
    req.tier_limit = Some(2);
    let tier_send = |id: &'static str, user: usize, req: Request| {
        let s = subject(id, users[user].as_str(), Some("order_update"));
        async move { admit(store, &s, &req).await }
    };
    // "p0".."p20" already counted user 30 once: it is one of the 2.
    assert_eq!(
        tier_send("t1", 0, req.clone()).await,
        Verdict::Send { fallback: false }
    );
    assert_eq!(
        tier_send("t2", 1, req.clone()).await,
        Verdict::Defer {
            until: t + secs(86_400),
            why: DeferReason::TierExhausted { used: 2, limit: 2 }
        }
    );
    assert_eq!(
        tier_send("t3", 3, req.clone()).await,
        Verdict::Send { fallback: false },
        "inside the window"
    );
    // A webhook raised the tier: the stored limit wins.
    store.set_tier_limit(&w, Some(3)).await.unwrap();
    assert_eq!(
        tier_send("t4", 1, req.clone()).await,
        Verdict::Send { fallback: false }
    );
    assert!(matches!(
        tier_send("t5", 2, req.clone()).await,
        Verdict::Defer {
            why: DeferReason::TierExhausted { used: 3, limit: 3 },
            ..
        }
    ));
    store.set_tier_limit(&w, None).await.unwrap();
    assert_eq!(
        tier_send("t6", 2, req.clone()).await,
        Verdict::Send { fallback: false }
    );
}

/// Throughput: one send schedule per number, shared by every replica, slowed for a while by a
/// 130429.
async fn pacing(store: &dyn Store) {
    let t = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let w = waba();
    let number = PhoneNumberId::parse(NUMBER).unwrap();
    let ms = Duration::from_millis;
    let us = TimeDelta::microseconds;
    // At 10 msg/s: a slot every 100 ms.
    let book = |at: DateTime<Utc>| {
        let (w, number) = (w.clone(), number.clone());
        async move { store.book_slot(&w, &number, at, ms(100)).await.unwrap() }
    };
    // Replicas booking at the same moment (or a little later) share one schedule.
    assert_eq!(book(t).await, ms(0));
    assert_eq!(book(t).await, ms(100));
    assert_eq!(book(t + us(30_000)).await, ms(170));
    assert_eq!(book(t).await, ms(300));
    // A schedule in the past costs nothing.
    let later = t + TimeDelta::seconds(20);
    assert_eq!(book(later).await, ms(0));
    assert_eq!(book(later).await, ms(100));
    // Two 130429s: a tenth slower, then another tenth, for the cool-down, for everyone.
    let at = later + TimeDelta::seconds(1);
    store.throttled(&w, &number, at, ms(5_000)).await.unwrap();
    assert_eq!(book(at).await, ms(0));
    assert_eq!(book(at).await, Duration::from_micros(111_111));
    store.throttled(&w, &number, at, ms(5_000)).await.unwrap();
    let at = at + TimeDelta::seconds(1);
    assert_eq!(book(at).await, ms(0));
    assert_eq!(book(at).await, Duration::from_micros(123_456));
    // The cool-down over: full speed again.
    let at = at + TimeDelta::seconds(10);
    assert_eq!(book(at).await, ms(0));
    assert_eq!(book(at).await, ms(100));
}

/// A slot close enough is booked and admitted in one call; a later one is booked and waited
/// for with nothing claimed.
async fn booked_admission(store: &dyn Store) {
    let t = now();
    let ms = Duration::from_millis;
    let (a, b) = ("4915100000061", "4915100000062");
    for to in [a, b] {
        let s = subject("x", to, None);
        store
            .record_inbound(&waba(), &s.number, &s.to, t - secs(60))
            .await
            .unwrap();
    }
    let req = request(t, false);
    // At 10 msg/s: a slot every 100 ms; admit when the slot is at most 5 ms away.
    let ask = SlotAsk {
        now: t,
        interval: ms(100),
        within: ms(5),
    };
    let first = subject("slot-1", a, None);
    assert_eq!(
        store.book_and_admit(&first, &req, &ask).await.unwrap(),
        Booked::Admitted {
            wait: ms(0),
            verdict: Verdict::Send { fallback: false }
        }
    );
    // Claimed: the same job asked again is busy.
    assert!(matches!(
        admit(store, &first, &req).await,
        Verdict::Defer {
            why: DeferReason::ClaimedElsewhere,
            ..
        }
    ));
    // The next slot is 100 ms away: booked, nothing claimed, so admission alone then sends.
    let second = subject("slot-2", b, None);
    assert_eq!(
        store.book_and_admit(&second, &req, &ask).await.unwrap(),
        Booked::Later(ms(100))
    );
    assert_eq!(
        admit(store, &second, &req).await,
        Verdict::Send { fallback: false }
    );
    // Both calls booked a slot: the schedule's next one is 200 ms away.
    let number = PhoneNumberId::parse(NUMBER).unwrap();
    assert_eq!(
        store.book_slot(&waba(), &number, t, ms(100)).await.unwrap(),
        ms(200)
    );
    // A refusal (free-form outside the window) and a deferral (the pair rate of a recipient
    // just written to, burst spent) are answered at once and take no slot from the jobs that
    // can go: the next slot is still the one after the 200 ms booked above.
    let closed = subject("refused", "4915100000063", None);
    let refused = store.book_and_admit(&closed, &req, &ask).await.unwrap();
    assert!(
        matches!(
            refused,
            Booked::Admitted {
                wait: Duration::ZERO,
                verdict: Verdict::Dead { .. }
            }
        ),
        "{refused:?}"
    );
    let mut spent = request(t, false);
    spent.pair.burst = 1;
    let again = subject("slot-3", b, None);
    let deferred = store.book_and_admit(&again, &spent, &ask).await.unwrap();
    assert!(
        matches!(
            deferred,
            Booked::Admitted {
                wait: Duration::ZERO,
                verdict: Verdict::Defer {
                    why: DeferReason::PairRate,
                    ..
                }
            }
        ),
        "{deferred:?}"
    );
    assert_eq!(
        store.job(&key("refused")).await.unwrap(),
        None,
        "nothing claimed"
    );
    assert_eq!(
        store.book_slot(&waba(), &number, t, ms(100)).await.unwrap(),
        ms(300),
        "neither took a slot"
    );
}

/// Consent, campaigns, heartbeats and locks read back what was written.
async fn records(store: &dyn Store) {
    let t = now();
    let w = waba();
    let to = WaId::parse("4915100000050").unwrap();
    assert_eq!(store.consent(&w, &to).await.unwrap(), Consent::default());
    store
        .record_opt_ins(&w, &[(to.clone(), mark(t, "csv:a.csv"))])
        .await
        .unwrap();
    store
        .record_opt_out(&w, &to, Some(mark(t + secs(1), "keyword:STOP")))
        .await
        .unwrap();
    assert_eq!(
        store.consent(&w, &to).await.unwrap(),
        Consent {
            opt_in: Some(mark(t, "csv:a.csv")),
            opt_out: Some(mark(t + secs(1), "keyword:STOP"))
        }
    );
    store.record_opt_out(&w, &to, None).await.unwrap();
    assert_eq!(store.consent(&w, &to).await.unwrap().opt_out, None);

    let c = CampaignId::parse("spring").unwrap();
    assert_eq!(store.campaign(&w, &c).await.unwrap(), None);
    store
        .set_campaign(&w, &c, CampaignState::Paused)
        .await
        .unwrap();
    assert_eq!(
        store.campaign(&w, &c).await.unwrap(),
        Some(CampaignState::Paused)
    );

    let number = PhoneNumberId::parse(NUMBER).unwrap();
    let numbers = [number.clone()];
    let beat = |replica: &'static str, at: DateTime<Utc>| Heartbeat {
        group: "g",
        replica,
        now: at,
        ttl: Duration::from_secs(3),
        numbers: &numbers,
    };
    assert_eq!(store.heartbeat(&beat("r1", t)).await.unwrap().replicas, 1);
    assert_eq!(store.heartbeat(&beat("r2", t)).await.unwrap().replicas, 2);
    // r1 falls silent: gone after its ttl.
    let live = store.heartbeat(&beat("r2", t + secs(4))).await.unwrap();
    assert_eq!(live.replicas, 1);
    assert!(live.throughput.is_empty());
    store.set_throughput(&number, 1000).await.unwrap();
    store.heartbeat(&beat("r3", t + secs(4))).await.unwrap();
    store.leave("g", "r3").await.unwrap();
    let live = store.heartbeat(&beat("r2", t + secs(5))).await.unwrap();
    assert_eq!(live.replicas, 1);
    assert_eq!(live.throughput.get(&number), Some(&1000));

    assert!(
        store
            .try_lock("sync", "r1", Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert!(
        !store
            .try_lock("sync", "r2", Duration::from_secs(30))
            .await
            .unwrap()
    );
    store.unlock("sync", "r2").await.unwrap();
    assert!(
        !store
            .try_lock("sync", "r2", Duration::from_secs(30))
            .await
            .unwrap()
    );
    store.unlock("sync", "r1").await.unwrap();
    assert!(
        store
            .try_lock("sync", "r2", Duration::from_secs(30))
            .await
            .unwrap()
    );
}

/// Message statuses (compare and set) and the reports they count into.
async fn messages(store: &dyn Store) {
    let campaign = CampaignId::parse("spring").unwrap();
    let wamid = Wamid::parse("wamid.M1").unwrap();
    let record = WamidRecord {
        job_id: "m1".into(),
        campaign_id: Some("spring".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        metadata: serde_json::Value::Null,
        resend: None,
    };
    store.mark_sent(&key("m1"), &wamid, &record).await.unwrap();
    let tally = |reached: &[&'static str], micros: Option<i64>| Tally {
        report: true,
        campaign: Some(campaign.clone()),
        reached: reached.to_vec(),
        cost: micros.map(|micros| Cost {
            category: "marketing".into(),
            micros,
        }),
    };
    let apply = async |expected: Option<&str>, status: &str, tally: Tally| {
        store
            .apply_status(&waba(), &wamid, expected, status, &tally)
            .await
            .unwrap()
    };
    // Compare and set: only from the status recorded.
    assert!(apply(None, "sent", tally(&["sent"], Some(150_200))).await);
    assert!(!apply(None, "sent", tally(&["sent"], Some(150_200))).await);
    assert!(!apply(Some("delivered"), "read", tally(&["read"], None)).await);
    // Meta prices the message again on a later status: counted once.
    assert!(
        apply(
            Some("sent"),
            "read",
            tally(&["delivered", "read"], Some(150_200))
        )
        .await
    );
    let message = store.message(&waba(), &wamid).await.unwrap();
    assert_eq!(
        (message.record, message.status.as_deref(), message.priced),
        (Some(record), Some("read"), true)
    );
    // Dead letters count once per job.
    for _ in 0..2 {
        store
            .mark_dead(&key("m2"), DeadReason::NoOptIn, Some(&campaign))
            .await
            .unwrap();
    }
    store
        .mark_dead(&key("m3"), DeadReason::Expired, None)
        .await
        .unwrap();

    let spring = store.report(&waba(), Some(&campaign)).await.unwrap();
    let mut expected = Report::default();
    for (field, n) in [
        ("accepted", 1),
        ("status:sent", 1),
        ("status:delivered", 1),
        ("status:read", 1),
        ("dead:no_opt_in", 1),
        ("billable:marketing", 1),
        ("cost:marketing", 150_200),
    ] {
        expected.add(field, n);
    }
    assert_eq!(spring, expected);
    // The portfolio's report counts every job, with or without a campaign.
    expected.add("dead:expired", 1);
    assert_eq!(store.report(&waba(), None).await.unwrap(), expected);
    let other = CampaignId::parse("autumn").unwrap();
    assert_eq!(
        store.report(&waba(), Some(&other)).await.unwrap(),
        Report::default()
    );
}

/// Halts: raised for every replica, listed while in force, replaced by scope, lifted by hand.
async fn halts(store: &dyn Store) {
    use wa_sender::store::{Halt, HaltScope};
    let now = Utc::now();
    let halt = |scope: &HaltScope, code: i64, until: i64| Halt {
        scope: scope.to_string(),
        code,
        cause: "test".into(),
        at: now,
        until: now + TimeDelta::seconds(until),
    };
    let number = HaltScope::Number(PhoneNumberId::parse("106540352242922").unwrap());
    let waba = HaltScope::Waba(WabaId::parse("102290129340398").unwrap());
    assert!(store.halts(now).await.unwrap().is_empty());
    store.raise_halt(&halt(&number, 131048, 600)).await.unwrap();
    store.raise_halt(&halt(&waba, 131031, 10)).await.unwrap();
    store
        .raise_halt(&halt(&HaltScope::Token, 190, 600))
        .await
        .unwrap();
    let scopes = |halts: Vec<Halt>| halts.into_iter().map(|h| h.scope).collect::<Vec<_>>();
    assert_eq!(
        scopes(store.halts(now).await.unwrap()),
        ["number:106540352242922", "token", "waba:102290129340398"]
    );
    // Ended: not in force any more.
    let later = now + TimeDelta::seconds(11);
    assert_eq!(
        scopes(store.halts(later).await.unwrap()),
        ["number:106540352242922", "token"]
    );
    // The same scope again replaces it.
    store.raise_halt(&halt(&number, 131048, 5)).await.unwrap();
    assert_eq!(scopes(store.halts(later).await.unwrap()), ["token"]);
    assert!(store.lift_halt(&HaltScope::Token).await.unwrap());
    assert!(!store.lift_halt(&HaltScope::Token).await.unwrap());
    assert!(store.halts(later).await.unwrap().is_empty());
    assert_eq!(HaltScope::parse("number:106540352242922"), Some(number));
    assert_eq!(HaltScope::parse("waba:102290129340398"), Some(waba));
    assert_eq!(HaltScope::parse("app"), Some(HaltScope::App));
    assert_eq!(HaltScope::parse("number:abc"), None);
    assert_eq!(HaltScope::parse("everything"), None);
}

/// A job's latest deferral is kept beside its record, and outlives a released claim (which
/// drops the record).
async fn deferrals(store: &dyn Store) {
    let t = now();
    let to = "4915100000060";
    store
        .record_inbound(
            &waba(),
            &subject("x", to, None).number,
            &WaId::parse(to).unwrap(),
            t - secs(60),
        )
        .await
        .unwrap();
    assert_eq!(store.deferral(&key("d")).await.unwrap(), None);
    let first = Deferral {
        at: t,
        until: t + secs(6),
        cause: "pair rate to this recipient".into(),
    };
    store.note_deferral(&key("d"), &first).await.unwrap();
    assert_eq!(store.deferral(&key("d")).await.unwrap(), Some(first));

    assert_eq!(
        admit(store, &subject("d", to, None), &request(t, false)).await,
        Verdict::Send { fallback: false }
    );
    store.release(&key("d"), "w1").await.unwrap();
    assert_eq!(store.job(&key("d")).await.unwrap(), None, "claim released");
    let second = Deferral {
        at: t + secs(1),
        until: t + secs(61),
        cause: "retry after 131016".into(),
    };
    store.note_deferral(&key("d"), &second).await.unwrap();
    assert_eq!(
        store.deferral(&key("d")).await.unwrap(),
        Some(second),
        "the latest deferral replaces the one before"
    );
    assert_eq!(store.deferral(&key("other")).await.unwrap(), None);
}

async fn conformance(fresh: impl AsyncFn() -> Arc<dyn Store>) {
    deferrals(fresh().await.as_ref()).await;
    halts(fresh().await.as_ref()).await;
    messages(fresh().await.as_ref()).await;
    idempotency(fresh().await.as_ref()).await;
    rules(fresh().await.as_ref()).await;
    unsynced_registry(fresh().await.as_ref()).await;
    limits(fresh().await.as_ref()).await;
    pacing(fresh().await.as_ref()).await;
    booked_admission(fresh().await.as_ref()).await;
    records(fresh().await.as_ref()).await;
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance(async || Arc::new(MemoryStore::new()) as Arc<dyn Store>).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let prefix = format!("t-store-{}", uuid::Uuid::new_v4().simple());
    let created = std::sync::Mutex::new(Vec::new());
    conformance(async || {
        let n = created.lock().unwrap().len();
        let store = RedisStore::connect("redis://127.0.0.1:6379/0", &format!("{prefix}-{n}"))
            .await
            .unwrap_or_else(|e| panic!("integration tests need Redis: {e}"));
        created.lock().unwrap().push(store.clone());
        Arc::new(store) as Arc<dyn Store>
    })
    .await;
    for store in created.into_inner().unwrap() {
        store.delete_all().await.unwrap();
    }
}

#[tokio::test]
async fn redis_cluster_store_conforms() {
    let cluster = common::node::RedisCluster::start("conformance", 3);
    let urls = cluster.urls();
    let prefix = format!("t-cluster-{}", uuid::Uuid::new_v4().simple());
    let created = std::sync::Mutex::new(0);
    conformance(async || {
        let n = {
            let mut created = created.lock().unwrap();
            *created += 1;
            *created
        };
        let store = RedisStore::connect_to(Deployment::Cluster(&urls), &format!("{prefix}-{n}"))
            .await
            .unwrap_or_else(|e| panic!("the test's Redis Cluster: {e}"));
        Arc::new(store) as Arc<dyn Store>
    })
    .await;
}

/// A template job's request whose categories need no opt-in.
fn without_opt_in(t: DateTime<Utc>) -> Request {
    Request {
        opt_in: OptInPolicy {
            marketing: false,
            utility: false,
            authentication: false,
        },
        ..request(t, true)
    }
}

/// The portfolio's templates, replaced by `order_update` alone (approved, utility).
async fn approve_only_order_update(store: &dyn Store, t: DateTime<Utc>) {
    store
        .put_templates(
            &waba(),
            &[definition("order_update", "APPROVED", "UTILITY")],
            t,
        )
        .await
        .unwrap();
}

/// A Redis that no longer knows the store's scripts (restarted, or a replica promoted, or its
/// script cache flushed) is given them again: the call that finds its script missing loads it
/// and runs. On a Redis of the test's own: flushing the shared one's scripts would reach every
/// test running beside it.
#[tokio::test]
async fn a_redis_that_forgot_the_scripts_is_given_them_again() {
    let redis = common::node::RedisNode::start("scripts");
    let store = RedisStore::connect(&redis.url(), "t-scripts")
        .await
        .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = now();
    approve_only_order_update(&store, t).await;
    let no_opt_in = without_opt_in(t);
    for i in 0..3 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let job = subject(
            &format!("j{i}"),
            &format!("491510000200{i}"),
            Some("order_update"),
        );
        let v = admit(&store, &job, &no_opt_in).await;
        assert_eq!(v, Verdict::Send { fallback: false }, "admission {i}");
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let wamid = Wamid::parse(format!("wamid.scripts{i}")).unwrap();
        let record = WamidRecord {
            job_id: format!("j{i}"),
            campaign_id: None,
            traceparent: None,
            metadata: serde_json::Value::Null,
            resend: None,
        };
        store
            .mark_sent(&job.job, &wamid, &record)
            .await
            .unwrap_or_else(|e| panic!("mark_sent {i}: {e}"));
        assert_eq!(
            store.job(&job.job).await.unwrap(),
            Some(JobState::Sent(wamid)),
            "job {i} recorded as sent"
        );
    }
}

#[tokio::test]
async fn redis_admission_is_one_round_trip() {
    let prefix = format!("t-trips-{}", uuid::Uuid::new_v4().simple());
    let store = RedisStore::connect("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap();
    let t = now();
    approve_only_order_update(&store, t).await;
    let before = store.round_trips();
    for i in 0..50 {
        let to = format!("49151000010{i:02}");
        let v = admit(
            &store,
            &subject(&format!("j{i}"), &to, Some("order_update")),
            &without_opt_in(t),
        )
        .await;
        assert_eq!(v, Verdict::Send { fallback: false });
    }
    assert_eq!(
        store.round_trips() - before,
        50,
        "one request to Redis per admission"
    );
    // A send slot booked with the admission costs no second request.
    let before = store.round_trips();
    let ask = SlotAsk {
        now: t,
        interval: Duration::from_millis(1),
        within: Duration::from_secs(1),
    };
    let booked = store
        .book_and_admit(
            &subject("j-slot", "4915100001099", Some("order_update")),
            &without_opt_in(t),
            &ask,
        )
        .await
        .unwrap();
    assert!(matches!(booked, Booked::Admitted { .. }), "{booked:?}");
    assert_eq!(
        store.round_trips() - before,
        1,
        "slot and admission in one request"
    );
    store.delete_all().await.unwrap();
}

/// What Meta's account webhooks record, read back as admission and the worker read it: a
/// template's new category (marketing opt-outs now apply), the portfolio's messaging limit,
/// display numbers paired with their ids, and account halts, kept apart from the halts errors
/// raise, reported at most ten minutes ahead, lifted by their own end or by an operator.
async fn account_webhook_state(store: &dyn Store) {
    use wa_sender::store::{ACCOUNT_HALT_RECHECK, Halt, HaltScope, UNTIL_LIFTED};
    let t = now();
    let w = waba();
    let no_opt_in = |t| Request {
        opt_in: OptInPolicy {
            marketing: false,
            utility: false,
            authentication: false,
        },
        ..request(t, true)
    };
    approve_only_order_update(store, t).await;
    let user = "4915100000070";
    store
        .record_opt_out(&w, &WaId::parse(user).unwrap(), Some(mark(t, "test")))
        .await
        .unwrap();
    let send = |id: &'static str| {
        let s = subject(id, user, Some("order_update"));
        async move { admit(store, &s, &no_opt_in(t)).await }
    };
    assert_eq!(
        send("c1").await,
        Verdict::Send { fallback: false },
        "a utility template"
    );
    assert!(
        store
            .set_template_category(&w, "order_update", "en_US", Category::Marketing)
            .await
            .unwrap()
    );
    assert_eq!(
        dead_reason(&send("c2").await),
        Some(DeadReason::OptedOutMarketing),
        "marketing now: the opt-out applies"
    );
    let registry = store.templates(&w).await.unwrap();
    assert_eq!(registry[0].category(), Some(Category::Marketing));
    assert_eq!(
        registry[0].status, "APPROVED",
        "the rest of the definition stays"
    );
    assert!(
        !store
            .set_template_category(&w, "unknown", "en_US", Category::Marketing)
            .await
            .unwrap(),
        "a template not in the registry waits for a sync"
    );

    assert_eq!(store.tier_limit(&w).await.unwrap(), None);
    // "c1" reached one user outside the window: one of the 2.
    store.set_tier_limit(&w, Some(2)).await.unwrap();
    assert_eq!(store.tier_limit(&w).await.unwrap(), Some(Some(2)));
    approve_only_order_update(store, t).await;
    let tier_send = |id: &'static str, to: &'static str| {
        let s = subject(id, to, Some("order_update"));
        async move { admit(store, &s, &no_opt_in(t)).await }
    };
    assert_eq!(
        tier_send("l1", "4915100000071").await,
        Verdict::Send { fallback: false }
    );
    assert!(matches!(
        tier_send("l2", "4915100000072").await,
        Verdict::Defer {
            why: DeferReason::TierExhausted { used: 2, limit: 2 },
            ..
        }
    ));
    store.set_tier_limit(&w, None).await.unwrap();
    assert_eq!(store.tier_limit(&w).await.unwrap(), Some(None), "unlimited");

    let (a, b) = (
        PhoneNumberId::parse(NUMBER).unwrap(),
        PhoneNumberId::parse("106540352242923").unwrap(),
    );
    assert!(store.display_numbers(&w).await.unwrap().is_empty());
    store
        .record_display_number(&w, "15550783881", &a)
        .await
        .unwrap();
    store
        .record_display_number(&w, "15550783882", &a)
        .await
        .unwrap();
    store
        .record_display_number(&w, "15550783882", &b)
        .await
        .unwrap();
    assert_eq!(
        store.display_numbers(&w).await.unwrap(),
        std::collections::BTreeMap::from([
            ("15550783881".to_owned(), a.clone()),
            ("15550783882".to_owned(), b.clone()),
        ])
    );
    assert!(
        store
            .display_numbers(&WabaId::parse("102290129340399").unwrap())
            .await
            .unwrap()
            .is_empty()
    );

    let scope = HaltScope::Waba(w.clone());
    let halt = |code: i64, until: DateTime<Utc>| Halt {
        scope: scope.to_string(),
        code,
        cause: "test".into(),
        at: t,
        until,
    };
    let recheck = TimeDelta::from_std(ACCOUNT_HALT_RECHECK).unwrap();
    let ends = |halts: Vec<Halt>| {
        halts
            .into_iter()
            .map(|h| (h.scope, h.code, h.until))
            .collect::<Vec<_>>()
    };
    let waba_scope = scope.to_string();
    store
        .raise_account_halt("disabled", &halt(0, UNTIL_LIFTED))
        .await
        .unwrap();
    assert_eq!(
        ends(store.halts(t).await.unwrap()),
        [(waba_scope.clone(), 0, t + recheck)],
        "no end, reported ten minutes ahead"
    );
    let month = t + secs(30 * 86_400);
    assert_eq!(
        ends(store.halts(month).await.unwrap()),
        [(waba_scope.clone(), 0, month + recheck)],
        "still in force a month later"
    );
    // A 368 and its cool-down on the same scope shorten nothing.
    store.raise_halt(&halt(368, t + secs(60))).await.unwrap();
    assert_eq!(
        ends(store.halts(t + secs(120)).await.unwrap()),
        [(waba_scope.clone(), 0, t + secs(120) + recheck)]
    );
    store
        .raise_account_halt("restricted_business_initiated", &halt(0, t + secs(300)))
        .await
        .unwrap();
    let number = HaltScope::Number(a.clone());
    store
        .raise_halt(&Halt {
            scope: number.to_string(),
            ..halt(131048, t + secs(600))
        })
        .await
        .unwrap();
    // Reinstated: the disabled halt goes; the restriction (until its end) and the number's
    // halt stay.
    assert!(store.lift_account_halt("disabled", &scope).await.unwrap());
    assert!(!store.lift_account_halt("disabled", &scope).await.unwrap());
    assert_eq!(
        ends(store.halts(t).await.unwrap()),
        [
            (number.to_string(), 131048, t + secs(600)),
            (waba_scope.clone(), 0, t + secs(300)),
        ]
    );
    assert_eq!(
        ends(store.halts(t + secs(301)).await.unwrap()),
        [(number.to_string(), 131048, t + secs(600))],
        "the restriction ended"
    );
    // An operator's resume lifts every halt of the scope, and only of that scope.
    store
        .raise_account_halt("deleted", &halt(0, UNTIL_LIFTED))
        .await
        .unwrap();
    store.raise_halt(&halt(131031, t + secs(60))).await.unwrap();
    assert!(store.lift_halt(&scope).await.unwrap());
    assert_eq!(
        ends(store.halts(t).await.unwrap()),
        [(number.to_string(), 131048, t + secs(600))]
    );
    assert!(!store.lift_halt(&scope).await.unwrap());
}

#[tokio::test]
async fn memory_store_keeps_account_webhook_state() {
    account_webhook_state(&MemoryStore::new()).await;
}

#[tokio::test]
async fn redis_store_keeps_account_webhook_state() {
    let prefix = format!("t-account-{}", uuid::Uuid::new_v4().simple());
    let store = RedisStore::connect("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap_or_else(|e| panic!("integration tests need Redis: {e}"));
    account_webhook_state(&store).await;
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn redis_cluster_store_keeps_account_webhook_state() {
    let cluster = common::node::RedisCluster::start("account", 3);
    let urls = cluster.urls();
    let prefix = format!("t-cluster-account-{}", uuid::Uuid::new_v4().simple());
    let store = RedisStore::connect_to(Deployment::Cluster(&urls), &prefix)
        .await
        .unwrap_or_else(|e| panic!("the test's Redis Cluster: {e}"));
    account_webhook_state(&store).await;
}
