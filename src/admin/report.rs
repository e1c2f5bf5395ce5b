//! `wa-sender campaign report` and `GET /v1/campaigns/{id}/report`: a campaign's outcomes,
//! rates and estimated cost, summed over every configured portfolio (a campaign may send from
//! numbers of several).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{Admin, AdminError, parse_campaign};
use crate::pricing::format_micros;
use crate::store::Report;

/// A campaign's report (or, for `campaign: None`, every job's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignReport {
    /// The campaign (`None`: every job of the configured portfolios).
    pub campaign_id: Option<String>,
    /// Jobs Meta accepted.
    pub accepted: u64,
    /// Accepted messages that reached each status (`sent`, `delivered`, `read`, `failed`); a
    /// status Meta skipped counts as reached when a later one arrives.
    pub statuses: BTreeMap<String, u64>,
    /// Jobs dead-lettered, per reason (before sending or from a failed status).
    pub dead_lettered: BTreeMap<String, u64>,
    /// delivered ÷ accepted (`None` before anything was accepted).
    pub delivery_rate: Option<f64>,
    /// read ÷ delivered (`None` before anything was delivered).
    pub read_rate: Option<f64>,
    /// Estimated cost from the rate card.
    pub cost: CostReport,
}

/// Estimated cost, per Meta pricing category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostReport {
    /// The rate card's currency.
    pub currency: String,
    /// The sum over the categories.
    pub total: String,
    /// Billable messages and their estimated cost, per category.
    pub categories: BTreeMap<String, CategoryCost>,
}

/// One category's share.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryCost {
    /// Billable messages.
    pub messages: u64,
    /// Their estimated cost.
    pub cost: String,
}

impl Admin {
    /// The rate card's currency given with [`Admin::with_currency`]; empty without it (the
    /// CLI passes its own to [`Admin::report`]).
    pub fn currency(&self) -> &str {
        self.currency.as_deref().unwrap_or_default()
    }

    /// A campaign's report (`None`: every job's), with costs in `currency`.
    pub async fn report(
        &self,
        campaign: Option<&str>,
        currency: &str,
    ) -> Result<CampaignReport, AdminError> {
        let id = campaign.map(parse_campaign).transpose()?;
        let mut sum = Report::default();
        for waba in self.wabas() {
            sum.merge(&self.store.report(&waba, id.as_ref()).await?);
        }
        Ok(CampaignReport::new(
            id.map(|c| c.to_string()),
            &sum,
            currency,
        ))
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

impl CampaignReport {
    /// The report of these counters.
    pub fn new(campaign_id: Option<String>, report: &Report, currency: &str) -> Self {
        let categories = report
            .billable
            .iter()
            .map(|(category, messages)| {
                let micros = report.cost_micros.get(category).copied().unwrap_or(0);
                let cost = format_micros(micros);
                (
                    category.clone(),
                    CategoryCost {
                        messages: *messages,
                        cost,
                    },
                )
            })
            .collect();
        CampaignReport {
            campaign_id,
            accepted: report.accepted,
            statuses: report.statuses.clone(),
            dead_lettered: report.dead.clone(),
            delivery_rate: ratio(report.reached("delivered"), report.accepted),
            read_rate: ratio(report.reached("read"), report.reached("delivered")),
            cost: CostReport {
                currency: currency.to_owned(),
                total: format_micros(report.cost_micros.values().sum()),
                categories,
            },
        }
    }

    /// The report as a table for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = self.campaign_id.as_deref().unwrap_or("(all jobs)");
        let percent = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0));
        let _ = writeln!(out, "campaign {name}");
        if self.accepted == 0 && self.dead_lettered.is_empty() {
            let _ = writeln!(
                out,
                "  nothing recorded yet: no job of it was accepted or dead-lettered (is the id right?)"
            );
        }
        let _ = writeln!(out, "  accepted            {:>10}", self.accepted);
        for status in ["sent", "delivered", "read", "failed"] {
            let n = self.statuses.get(status).copied().unwrap_or(0);
            let _ = writeln!(out, "  {status:<19} {n:>10}");
        }
        let _ = writeln!(
            out,
            "  delivery rate       {:>10}",
            percent(self.delivery_rate)
        );
        let _ = writeln!(out, "  read rate           {:>10}", percent(self.read_rate));
        let dead: u64 = self.dead_lettered.values().sum();
        let _ = writeln!(out, "  dead-lettered       {dead:>10}");
        for (reason, n) in &self.dead_lettered {
            let _ = writeln!(out, "    {reason:<24} {n:>7}");
        }
        let _ = writeln!(
            out,
            "  estimated cost      {:>10} {}",
            self.cost.total, self.cost.currency
        );
        for (category, c) in &self.cost.categories {
            let _ = writeln!(
                out,
                "    {category:<16} {:>7} messages {:>10} {}",
                c.messages, c.cost, self.cost.currency
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_costs_come_from_the_counters() {
        let mut counters = Report::default();
        for (field, n) in [
            ("accepted", 10),
            ("status:sent", 10),
            ("status:delivered", 8),
            ("status:read", 2),
            ("status:failed", 1),
            ("dead:no_opt_in", 3),
            ("billable:marketing", 8),
            ("cost:marketing", 8 * 150_200),
        ] {
            counters.add(field, n);
        }
        let report = CampaignReport::new(Some("spring".into()), &counters, "USD");
        assert_eq!(report.delivery_rate, Some(0.8));
        assert_eq!(report.read_rate, Some(0.25));
        assert_eq!(report.cost.total, "1.2016");
        assert_eq!(report.cost.categories["marketing"].messages, 8);
        let table = report.render();
        assert!(table.contains("no_opt_in"), "{table}");
        assert!(table.contains("80.0%"), "{table}");
        let empty = CampaignReport::new(None, &Report::default(), "USD");
        assert_eq!((empty.delivery_rate, empty.read_rate), (None, None));
        assert_eq!(empty.cost.total, "0.00");
    }
}
