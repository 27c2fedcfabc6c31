//! What `--metrics-bind` serves at `/metrics` (Prometheus / OpenMetrics
//! text, with `prometheus-client`): counters kept as things happen, and
//! gauges read when scraped. Every label has a bounded set of values (the
//! route template, never a path; an outcome; a limit's code).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::runtime::events::Event;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub method: String,
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result_ {
    pub result: String,
}

/// What scraping reads from the rest of the server.
#[derive(Debug, Default, Clone, Copy)]
pub struct Now {
    pub live_agents: i64,
    pub loops: i64,
    pub streams: i64,
    pub choices_waiting: i64,
    pub oldest_choice_seconds: f64,
    pub webhook_queue: i64,
}

pub struct Metrics {
    registry: Registry,
    turns: Family<Outcome, Counter>,
    events: Counter,
    requests: Family<Route, Histogram>,
    rate_limited: Family<Limit, Counter>,
    deliveries: Family<Result_, Counter>,
    live_agents: Gauge,
    loops: Gauge,
    streams: Gauge,
    choices_waiting: Gauge,
    oldest_choice: Gauge<f64, std::sync::atomic::AtomicU64>,
    webhook_queue: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("loopd");
        let turns = Family::<Outcome, Counter>::default();
        registry.register(
            "turns",
            "Turns ended, by outcome (done, interrupted, or the error's code)",
            turns.clone(),
        );
        let events = Counter::default();
        registry.register(
            "events_appended",
            "Events written to loops' logs by this node",
            events.clone(),
        );
        let requests = Family::<Route, Histogram>::new_with_constructor(|| {
            // 100 µs to ~52 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 20))
        });
        registry.register(
            "request_duration_seconds",
            "Time to the response's head, by route template, method and status",
            requests.clone(),
        );
        let rate_limited = Family::<Limit, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429, by the limit's code",
            rate_limited.clone(),
        );
        let deliveries = Family::<Result_, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, refused, unreachable)",
            deliveries.clone(),
        );
        let live_agents = Gauge::default();
        registry.register(
            "live_agents",
            "Agent processes alive on this node",
            live_agents.clone(),
        );
        let loops = Gauge::default();
        registry.register("loops", "Loops not archived", loops.clone());
        let streams = Gauge::default();
        registry.register(
            "open_streams",
            "SSE streams open on this node",
            streams.clone(),
        );
        let choices_waiting = Gauge::default();
        registry.register(
            "choices_waiting",
            "Choices waiting for an answer",
            choices_waiting.clone(),
        );
        let oldest_choice = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "choice_oldest_wait_seconds",
            "How long the longest-waiting choice has waited (0 when none waits)",
            oldest_choice.clone(),
        );
        let webhook_queue = Gauge::default();
        registry.register(
            "webhook_queue",
            "Webhook deliveries waiting to be sent or retried",
            webhook_queue.clone(),
        );
        Self {
            registry,
            turns,
            events,
            requests,
            rate_limited,
            deliveries,
            live_agents,
            loops,
            streams,
            choices_waiting,
            oldest_choice,
            webhook_queue,
        }
    }

    /// Counts events this node wrote, and the turns they ended.
    pub fn appended<'a>(&self, events: impl Iterator<Item = &'a Event>) {
        let mut n = 0;
        for event in events {
            n += 1;
            let outcome = match event {
                Event::Done { .. } => "done",
                Event::Interrupted { .. } => "interrupted",
                Event::Error {
                    turn_id: Some(_),
                    code,
                    ..
                } => code.as_str(),
                _ => continue,
            };
            self.turns
                .get_or_create(&Outcome {
                    outcome: outcome.to_owned(),
                })
                .inc();
        }
        self.events.inc_by(n);
    }

    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let labels = Route {
            method: method.to_owned(),
            route: route.to_owned(),
            status: status.to_string(),
        };
        self.requests.get_or_create(&labels).observe(seconds);
    }

    pub fn rate_limited(&self, code: &str) {
        let labels = Limit {
            limit: code.to_owned(),
        };
        self.rate_limited.get_or_create(&labels).inc();
    }

    pub fn delivery(&self, result: &str) {
        let labels = Result_ {
            result: result.to_owned(),
        };
        self.deliveries.get_or_create(&labels).inc();
    }

    /// The text a scrape gets, with the gauges set from `now`.
    pub fn render(&self, now: Now) -> String {
        self.live_agents.set(now.live_agents);
        self.loops.set(now.loops);
        self.streams.set(now.streams);
        self.choices_waiting.set(now.choices_waiting);
        self.oldest_choice.set(now.oldest_choice_seconds);
        self.webhook_queue.set(now.webhook_queue);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_turns_by_outcome_and_renders_text() {
        let m = Metrics::new();
        let t = || crate::runtime::events::TurnId::from("turn_1");
        m.appended(
            [
                Event::Done {
                    turn_id: t(),
                    usage: None,
                },
                Event::Interrupted { turn_id: t() },
                Event::Error {
                    turn_id: Some(t()),
                    code: "agent_crashed".into(),
                    message: "x".into(),
                },
                Event::AssistantDelta {
                    turn_id: t(),
                    text: "x".into(),
                },
            ]
            .iter(),
        );
        m.request("GET", "/api/v1/loops", 200, 0.002);
        m.rate_limited("too_many_requests");
        let text = m.render(Now {
            live_agents: 2,
            ..Now::default()
        });
        for line in [
            "loopd_events_appended_total 4",
            "loopd_turns_total{outcome=\"done\"} 1",
            "loopd_turns_total{outcome=\"agent_crashed\"} 1",
            "loopd_live_agents 2",
            "loopd_rate_limited_total{limit=\"too_many_requests\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(
            text.contains("loopd_request_duration_seconds_bucket{"),
            "{text}"
        );
    }
}
