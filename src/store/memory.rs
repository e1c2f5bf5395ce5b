//! The in-process store: admission is [`admission::admit`] itself, under one lock, over maps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use super::{
    Booked, Deferral, Halt, HaltScope, Heartbeat, JobKey, Live, Message, Report, SlotAsk, Store,
    StoreError, Subject, Tally, WamidRecord,
};
use crate::event::DeadReason;
use crate::ids::{CampaignId, PhoneNumberId, WaId, WabaId, Wamid};
use crate::job::Category;
use crate::policy::admission::{
    self, CampaignState, Consent, Effects, JobState, Mark, PairState, Request, Snapshot,
    TemplateState, TierState, Verdict,
};
use crate::policy::pace::PaceState;
use crate::policy::template::TemplateDefinition;

#[derive(Default)]
struct Portfolio {
    windows: HashMap<(PhoneNumberId, WaId), DateTime<Utc>>,
    consent: HashMap<WaId, Consent>,
    campaigns: HashMap<CampaignId, CampaignState>,
    templates: BTreeMap<(String, String), TemplateDefinition>,
    synced: bool,
    tier: HashMap<WaId, DateTime<Utc>>,
    tier_limit: Option<Option<u32>>,
    displays: BTreeMap<String, PhoneNumberId>,
    pairs: HashMap<(PhoneNumberId, WaId), PairState>,
    paces: HashMap<PhoneNumberId, PaceState>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobKey, JobState>,
    deferrals: HashMap<JobKey, Deferral>,
    messages: HashMap<(WabaId, Wamid), Message>,
    reports: HashMap<(WabaId, Option<CampaignId>), Report>,
    portfolios: HashMap<WabaId, Portfolio>,
    replicas: HashMap<String, HashMap<String, DateTime<Utc>>>,
    throughput: HashMap<PhoneNumberId, u32>,
    locks: HashMap<String, (String, DateTime<Utc>)>,
    /// By scope, and account halts by [`super::account_halt_field`], as Redis keeps them.
    halts: BTreeMap<String, Halt>,
}

/// The in-process store (nothing expires but what the rules read as expired).
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl State {
    /// Applies `f` to the portfolio's report and, for a campaign's job, the campaign's.
    fn count(&mut self, waba: &WabaId, campaign: Option<&CampaignId>, f: impl Fn(&mut Report)) {
        f(self.reports.entry((waba.clone(), None)).or_default());
        if let Some(campaign) = campaign {
            f(self
                .reports
                .entry((waba.clone(), Some(campaign.clone())))
                .or_default());
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, StoreError> {
        Ok(f(&mut self.state.lock().expect("store lock")))
    }
}

fn since(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now - TimeDelta::from_std(d).expect("small duration")
}

/// Admission's verdict on the state now, and what it would change (nothing is changed yet).
fn decide(state: &mut State, subject: &Subject, req: &Request) -> (Verdict, Effects) {
    let now = req.now;
    let job = state.jobs.get(&subject.job).cloned();
    let p = state
        .portfolios
        .entry(subject.job.waba.clone())
        .or_default();
    let pair_key = (subject.number.clone(), subject.to.clone());
    let cutoff = since(now, admission::TIER_WINDOW);
    p.tier.retain(|_, at| *at > cutoff);
    let snapshot = Snapshot {
        job,
        last_inbound: p.windows.get(&pair_key).copied(),
        consent: p.consent.get(&subject.to).cloned().unwrap_or_default(),
        campaign: subject
            .campaign
            .as_ref()
            .and_then(|c| p.campaigns.get(c).copied()),
        template: subject.template.as_ref().and_then(|k| {
            p.templates.get(k).map(|d| TemplateState {
                status: d.status.clone(),
                category: d.category().unwrap_or(Category::Marketing),
            })
        }),
        registry_synced: p.synced,
        tier: TierState {
            counted: p.tier.contains_key(&subject.to),
            used: p.tier.len() as u32,
            oldest: p.tier.values().min().copied(),
            limit: p.tier_limit,
        },
        pair: p.pairs.get(&pair_key).copied(),
    };
    admission::admit(req, &snapshot)
}

/// Makes admission's `effects` so: the claim, the pair rate and the tier charged.
fn apply(state: &mut State, subject: &Subject, req: &Request, effects: Effects) {
    let p = state
        .portfolios
        .entry(subject.job.waba.clone())
        .or_default();
    if let Some(pair) = effects.pair {
        p.pairs
            .insert((subject.number.clone(), subject.to.clone()), pair);
    }
    if effects.tier {
        p.tier.insert(subject.to.clone(), req.now);
    }
    if let Some(job) = effects.job {
        state.jobs.insert(subject.job.clone(), job);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn admit(&self, subject: &Subject, req: &Request) -> Result<Verdict, StoreError> {
        self.with(|state| {
            let (verdict, effects) = decide(state, subject, req);
            apply(state, subject, req, effects);
            verdict
        })
    }

    async fn book_and_admit(
        &self,
        subject: &Subject,
        req: &Request,
        ask: &SlotAsk,
    ) -> Result<Booked, StoreError> {
        self.with(|state| {
            let (verdict, effects) = decide(state, subject, req);
            if !matches!(verdict, Verdict::Send { .. }) {
                apply(state, subject, req, effects);
                return Booked::Admitted {
                    wait: Duration::ZERO,
                    verdict,
                };
            }
            let p = state
                .portfolios
                .entry(subject.job.waba.clone())
                .or_default();
            let pace = p.paces.entry(subject.number.clone()).or_default();
            let (at, next) = pace.book(ask.now, ask.interval);
            *pace = next;
            let wait = (at - ask.now).to_std().unwrap_or_default();
            if wait > ask.within {
                return Booked::Later(wait);
            }
            apply(state, subject, req, effects);
            Booked::Admitted { wait, verdict }
        })
    }

    async fn mark_sent(
        &self,
        key: &JobKey,
        wamid: &Wamid,
        record: &WamidRecord,
    ) -> Result<(), StoreError> {
        let campaign = record
            .campaign_id
            .clone()
            .and_then(|c| CampaignId::parse(c).ok());
        self.with(|s| {
            s.jobs.insert(key.clone(), JobState::Sent(wamid.clone()));
            s.messages
                .entry((key.waba.clone(), wamid.clone()))
                .or_default()
                .record = Some(record.clone());
            s.count(&key.waba, campaign.as_ref(), |r| r.accepted += 1);
        })
    }

    async fn mark_ambiguous(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            if matches!(s.jobs.get(key), Some(JobState::Claimed { owner: o, .. }) if o == owner) {
                s.jobs.insert(key.clone(), JobState::Ambiguous { at: now });
            }
        })
    }

    async fn reopen(&self, key: &JobKey, wamid: &Wamid) -> Result<bool, StoreError> {
        self.with(|s| {
            let sent = matches!(s.jobs.get(key), Some(JobState::Sent(w)) if w == wamid);
            if sent {
                s.jobs.remove(key);
            }
            sent
        })
    }

    async fn reopen_dead(&self, key: &JobKey) -> Result<bool, StoreError> {
        self.with(|s| {
            let dead = s.jobs.get(key) == Some(&JobState::Dead);
            if dead {
                s.jobs.remove(key);
            }
            dead
        })
    }

    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError> {
        self.with(|s| s.jobs.get(key).cloned())
    }

    async fn note_deferral(&self, key: &JobKey, deferral: &Deferral) -> Result<(), StoreError> {
        self.with(|s| {
            s.deferrals.insert(key.clone(), deferral.clone());
        })
    }

    async fn deferral(&self, key: &JobKey) -> Result<Option<Deferral>, StoreError> {
        self.with(|s| s.deferrals.get(key).cloned())
    }

    async fn release(&self, key: &JobKey, owner: &str) -> Result<(), StoreError> {
        self.with(|s| {
            if matches!(s.jobs.get(key), Some(JobState::Claimed { owner: o, .. }) if o == owner) {
                s.jobs.remove(key);
            }
        })
    }

    async fn mark_dead(
        &self,
        key: &JobKey,
        reason: DeadReason,
        campaign: Option<&CampaignId>,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            if s.jobs.insert(key.clone(), JobState::Dead) != Some(JobState::Dead) {
                s.count(&key.waba, campaign, |r| r.add(&format!("dead:{reason}"), 1));
            }
        })
    }

    async fn message(&self, waba: &WabaId, wamid: &Wamid) -> Result<Message, StoreError> {
        self.with(|s| {
            s.messages
                .get(&(waba.clone(), wamid.clone()))
                .cloned()
                .unwrap_or_default()
        })
    }

    async fn apply_status(
        &self,
        waba: &WabaId,
        wamid: &Wamid,
        expected: Option<&str>,
        status: &str,
        tally: &Tally,
    ) -> Result<bool, StoreError> {
        self.with(|s| {
            let message = s.messages.entry((waba.clone(), wamid.clone())).or_default();
            if message.status.as_deref() != expected {
                return false;
            }
            message.status = Some(status.to_owned());
            let cost = tally.cost.clone().filter(|_| !message.priced);
            message.priced |= tally.cost.is_some();
            if tally.report {
                s.count(waba, tally.campaign.as_ref(), |r| {
                    for reached in &tally.reached {
                        r.add(&format!("status:{reached}"), 1);
                    }
                    if let Some(cost) = &cost {
                        r.add(&format!("billable:{}", cost.category), 1);
                        r.add(&format!("cost:{}", cost.category), cost.micros);
                    }
                });
            }
            true
        })
    }

    async fn report(
        &self,
        waba: &WabaId,
        campaign: Option<&CampaignId>,
    ) -> Result<Report, StoreError> {
        self.with(|s| {
            s.reports
                .get(&(waba.clone(), campaign.cloned()))
                .cloned()
                .unwrap_or_default()
        })
    }

    async fn record_inbound(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        to: &WaId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let windows = &mut s.portfolios.entry(waba.clone()).or_default().windows;
            let last = windows.entry((number.clone(), to.clone())).or_insert(at);
            *last = (*last).max(at);
        })
    }

    async fn record_opt_ins(
        &self,
        waba: &WabaId,
        opt_ins: &[(WaId, Mark)],
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let consent = &mut s.portfolios.entry(waba.clone()).or_default().consent;
            for (to, mark) in opt_ins {
                consent.entry(to.clone()).or_default().opt_in = Some(mark.clone());
            }
        })
    }

    async fn record_opt_out(
        &self,
        waba: &WabaId,
        to: &WaId,
        mark: Option<Mark>,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let consent = &mut s.portfolios.entry(waba.clone()).or_default().consent;
            consent.entry(to.clone()).or_default().opt_out = mark;
        })
    }

    async fn consent(&self, waba: &WabaId, to: &WaId) -> Result<Consent, StoreError> {
        self.with(|s| {
            s.portfolios
                .get(waba)
                .and_then(|p| p.consent.get(to).cloned())
                .unwrap_or_default()
        })
    }

    async fn set_campaign(
        &self,
        waba: &WabaId,
        campaign: &CampaignId,
        state: CampaignState,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let campaigns = &mut s.portfolios.entry(waba.clone()).or_default().campaigns;
            campaigns.insert(campaign.clone(), state);
        })
    }

    async fn campaign(
        &self,
        waba: &WabaId,
        campaign: &CampaignId,
    ) -> Result<Option<CampaignState>, StoreError> {
        self.with(|s| {
            s.portfolios
                .get(waba)
                .and_then(|p| p.campaigns.get(campaign).copied())
        })
    }

    async fn put_templates(
        &self,
        waba: &WabaId,
        templates: &[TemplateDefinition],
        _at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let p = s.portfolios.entry(waba.clone()).or_default();
            p.templates = templates
                .iter()
                .map(|t| ((t.name.clone(), t.language.clone()), t.clone()))
                .collect();
            p.synced = true;
        })
    }

    async fn set_template_status(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
        status: &str,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            if let Some(t) = s
                .portfolios
                .get_mut(waba)
                .and_then(|p| p.templates.get_mut(&(name.to_owned(), language.to_owned())))
            {
                t.status = status.to_owned();
            }
        })
    }

    async fn templates(&self, waba: &WabaId) -> Result<Vec<TemplateDefinition>, StoreError> {
        self.with(|s| {
            s.portfolios
                .get(waba)
                .map(|p| p.templates.values().cloned().collect())
                .unwrap_or_default()
        })
    }

    async fn set_template_category(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
        category: Category,
    ) -> Result<bool, StoreError> {
        self.with(|s| {
            let template = s
                .portfolios
                .get_mut(waba)
                .and_then(|p| p.templates.get_mut(&(name.to_owned(), language.to_owned())));
            template
                .map(|t| t.category = category.as_str().to_ascii_uppercase())
                .is_some()
        })
    }

    async fn set_tier_limit(&self, waba: &WabaId, limit: Option<u32>) -> Result<(), StoreError> {
        self.with(|s| s.portfolios.entry(waba.clone()).or_default().tier_limit = Some(limit))
    }

    async fn tier_limit(&self, waba: &WabaId) -> Result<Option<Option<u32>>, StoreError> {
        self.with(|s| s.portfolios.get(waba).and_then(|p| p.tier_limit))
    }

    async fn record_display_number(
        &self,
        waba: &WabaId,
        display: &str,
        number: &PhoneNumberId,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let displays = &mut s.portfolios.entry(waba.clone()).or_default().displays;
            displays.insert(display.to_owned(), number.clone());
        })
    }

    async fn display_numbers(
        &self,
        waba: &WabaId,
    ) -> Result<BTreeMap<String, PhoneNumberId>, StoreError> {
        self.with(|s| {
            s.portfolios
                .get(waba)
                .map(|p| p.displays.clone())
                .unwrap_or_default()
        })
    }

    async fn set_throughput(&self, number: &PhoneNumberId, mps: u32) -> Result<(), StoreError> {
        self.with(|s| {
            s.throughput.insert(number.clone(), mps);
        })
    }

    async fn book_slot(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        now: DateTime<Utc>,
        interval: Duration,
    ) -> Result<Duration, StoreError> {
        self.with(|s| {
            let p = s.portfolios.entry(waba.clone()).or_default();
            let pace = p.paces.entry(number.clone()).or_default();
            let (at, next) = pace.book(now, interval);
            *pace = next;
            (at - now).to_std().unwrap_or_default()
        })
    }

    async fn throttled(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        now: DateTime<Utc>,
        cooldown: Duration,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let p = s.portfolios.entry(waba.clone()).or_default();
            let pace = p.paces.entry(number.clone()).or_default();
            *pace = pace.throttled(now, cooldown);
        })
    }

    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Live, StoreError> {
        self.with(|s| {
            let group = s.replicas.entry(beat.group.to_owned()).or_default();
            group.insert(beat.replica.to_owned(), beat.now);
            let cutoff = since(beat.now, beat.ttl);
            group.retain(|_, at| *at > cutoff);
            Live {
                replicas: group.len() as u32,
                throughput: beat
                    .numbers
                    .iter()
                    .filter_map(|n| s.throughput.get(n).map(|t| (n.clone(), *t)))
                    .collect(),
            }
        })
    }

    async fn leave(&self, group: &str, replica: &str) -> Result<(), StoreError> {
        self.with(|s| {
            if let Some(g) = s.replicas.get_mut(group) {
                g.remove(replica);
            }
        })
    }

    async fn try_lock(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.with(|s| {
            let now = Utc::now();
            match s.locks.get(name) {
                Some((_, until)) if *until > now => false,
                _ => {
                    let until = now + TimeDelta::from_std(ttl).expect("small duration");
                    s.locks.insert(name.to_owned(), (owner.to_owned(), until));
                    true
                }
            }
        })
    }

    async fn unlock(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        self.with(|s| {
            if s.locks.get(name).is_some_and(|(o, _)| o == owner) {
                s.locks.remove(name);
            }
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn raise_halt(&self, halt: &Halt) -> Result<(), StoreError> {
        let mut state = self.state.lock().expect("store lock");
        state.halts.insert(halt.scope.clone(), halt.clone());
        Ok(())
    }

    async fn raise_account_halt(&self, condition: &str, halt: &Halt) -> Result<(), StoreError> {
        let field = super::account_halt_field(condition, &halt.scope);
        self.with(|s| {
            s.halts.insert(field, halt.clone());
        })
    }

    async fn lift_account_halt(
        &self,
        condition: &str,
        scope: &HaltScope,
    ) -> Result<bool, StoreError> {
        let field = super::account_halt_field(condition, &scope.to_string());
        self.with(|s| s.halts.remove(&field).is_some())
    }

    async fn halts(&self, now: DateTime<Utc>) -> Result<Vec<Halt>, StoreError> {
        let mut state = self.state.lock().expect("store lock");
        state.halts.retain(|_, h| h.until > now);
        let recorded = state
            .halts
            .iter()
            .map(|(field, h)| (*field != h.scope, h.clone()));
        Ok(super::in_force(recorded, now))
    }

    async fn lift_halt(&self, scope: &HaltScope) -> Result<bool, StoreError> {
        let scope = scope.to_string();
        let mut state = self.state.lock().expect("store lock");
        let before = state.halts.len();
        state
            .halts
            .retain(|field, _| *field != scope && !super::is_account_halt_of(field, &scope));
        Ok(state.halts.len() < before)
    }
}
