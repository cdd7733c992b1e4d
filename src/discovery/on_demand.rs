//! On-demand discovery: the destinations this proxy calls, subscribed on first use (the first call waits for the
//! control plane's answer, bounded), answers kept (negative ones for a while), and released when unused.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use ferry_api::cidr::Cidr;
use ferry_api::protocol::Alias;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// How long the first call to a new destination waits for the control plane's answer.
pub const FIRST_CALL_WAIT: Duration = Duration::from_secs(1);
/// At most this many destinations subscribed at once (the control plane refuses more per stream); past it the
/// oldest negative answers go first, and a new destination waits for none.
pub const MAX_SUBSCRIPTIONS: usize = 4096;

/// The coarse clock of usage stamps: bumped by the sweeper, read by the data path (one relaxed load a request).
static TICK: AtomicU64 = AtomicU64::new(1);

/// The usage clock's current tick (what a Service's usage stamp is set to when a request routes to it).
pub fn tick() -> u64 {
    TICK.load(Ordering::Relaxed)
}

/// What a lookup found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovered {
    /// The control plane answered with the Services there: they are in the snapshot now.
    Found,
    /// No Service there (answered now, or earlier and still cached).
    Absent { cached: bool },
    /// No answer: the control plane is not connected, or did not answer within [`FIRST_CALL_WAIT`].
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Pending,
    /// The Services it named (`namespace/name`).
    Found(Vec<String>),
    Absent,
}

#[derive(Debug)]
struct Subscription {
    answer: Answer,
    /// When it was subscribed or last answered.
    since: Instant,
    /// Sent on the stream (a lookup added again after a release must be sent again, even if the name looks the same).
    sent: bool,
}

/// The subscriptions of one proxy, shared by the data path (which asks) and the xDS stream (which subscribes and
/// takes the answers).
pub struct OnDemand {
    subscriptions: Mutex<HashMap<Alias, Subscription>>,
    /// Woken when the set of subscriptions changed: the xDS stream sends the difference.
    pub changed: Notify,
    answers: watch::Sender<u64>,
    connected: AtomicBool,
    mesh_cidrs: Mutex<Vec<Cidr>>,
    idle: Duration,
    negative_ttl: Duration,
}

impl OnDemand {
    pub fn new(idle: Duration, negative_ttl: Duration) -> OnDemand {
        OnDemand {
            subscriptions: Mutex::default(),
            changed: Notify::new(),
            answers: watch::channel(0).0,
            connected: AtomicBool::new(false),
            mesh_cidrs: Mutex::default(),
            idle,
            negative_ttl,
        }
    }

    /// Asks the control plane about `alias` unless an answer is held, and waits (at most [`FIRST_CALL_WAIT`]) for it.
    pub async fn discover(&self, alias: Alias) -> Discovered {
        let mut answers = self.answers.subscribe();
        {
            let mut subs = self.subscriptions.lock().expect("subscriptions lock");
            match subs.get(&alias).map(|s| &s.answer) {
                Some(Answer::Found(_)) => return Discovered::Found,
                Some(Answer::Absent) => return Discovered::Absent { cached: true },
                Some(Answer::Pending) => {}
                None => {
                    if !self.connected.load(Ordering::Relaxed) {
                        return Discovered::Unavailable;
                    }
                    if subs.len() >= MAX_SUBSCRIPTIONS {
                        drop_oldest_negative(&mut subs);
                    }
                    if subs.len() >= MAX_SUBSCRIPTIONS {
                        return Discovered::Unavailable;
                    }
                    subs.insert(
                        alias.clone(),
                        Subscription { answer: Answer::Pending, since: Instant::now(), sent: false },
                    );
                    self.changed.notify_one();
                }
            }
        }
        let wait = async {
            loop {
                if answers.changed().await.is_err() {
                    return Discovered::Unavailable;
                }
                match self.subscriptions.lock().expect("subscriptions lock").get(&alias).map(|s| &s.answer) {
                    Some(Answer::Found(_)) => return Discovered::Found,
                    Some(Answer::Absent) => return Discovered::Absent { cached: false },
                    Some(Answer::Pending) => {}
                    None => return Discovered::Unavailable,
                }
            }
        };
        tokio::time::timeout(FIRST_CALL_WAIT, wait).await.unwrap_or(Discovered::Unavailable)
    }

    /// Whether traffic to `ip`, which no held Service claims, must be refused rather than passed through: it is inside
    /// the mesh's address ranges and the control plane has not answered for it (an answer, found or not, leaves the
    /// decision to the snapshot, as without on-demand discovery).
    pub fn refuses(&self, ip: IpAddr) -> bool {
        let inside = self.mesh_cidrs.lock().expect("cidrs lock").iter().any(|c| c.contains(ip));
        inside
            && matches!(
                self.subscriptions.lock().expect("subscriptions lock").get(&Alias::Ip(ip)).map(|s| &s.answer),
                None | Some(Answer::Pending)
            )
    }

    /// The mesh's address ranges, from the control plane's mesh settings.
    pub fn set_mesh_cidrs(&self, cidrs: Vec<Cidr>) {
        *self.mesh_cidrs.lock().expect("cidrs lock") = cidrs;
    }

    /// Marks the stream up for as long as the guard lives (an xDS stream holds it).
    pub fn connected(&self) -> Connected<'_> {
        self.set_connected(true);
        Connected(self)
    }

    /// The stream is up (lookups are sent) or down (new lookups are answered `Unavailable` at once).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        if !connected {
            // Nobody will answer what is pending: the waiters give up now, and the next call asks again.
            self.subscriptions.lock().expect("subscriptions lock").retain(|_, s| s.answer != Answer::Pending);
            self.answers.send_modify(|n| *n += 1);
        }
    }

    /// The subscription names to send: everything subscribed (a new stream), or the difference to what `sent` holds
    /// (which it then matches): (subscribe, unsubscribe).
    pub fn changes(&self, sent: &mut HashSet<String>) -> (Vec<String>, Vec<String>) {
        let mut subs = self.subscriptions.lock().expect("subscriptions lock");
        let names: HashSet<String> = subs.keys().map(Alias::name).collect();
        // New names, and names subscribed again since they were last sent (released and looked up anew between two
        // calls): the control plane answers a subscription each time it is sent.
        let mut subscribe: Vec<String> = Vec::new();
        for (alias, sub) in subs.iter_mut() {
            let name = alias.name();
            if !sub.sent || !sent.contains(&name) {
                subscribe.push(name);
            }
            sub.sent = true;
        }
        let unsubscribe: Vec<String> = sent.difference(&names).cloned().collect();
        *sent = names;
        (subscribe, unsubscribe)
    }

    /// Takes the answers a Service response (already applied) carries: an alias among a resource's aliases is found,
    /// an alias among the removed names is absent.
    pub fn answered(&self, response: &DeltaDiscoveryResponse) {
        let mut any = false;
        {
            let mut subs = self.subscriptions.lock().expect("subscriptions lock");
            let now = Instant::now();
            let mut found: HashMap<Alias, Vec<String>> = HashMap::new();
            for r in &response.resources {
                for alias in r.aliases.iter().filter_map(|a| Alias::parse(a)) {
                    found.entry(alias).or_default().push(r.name.clone());
                }
            }
            for (alias, services) in found {
                if let Some(s) = subs.get_mut(&alias) {
                    (s.answer, s.since) = (Answer::Found(services), now);
                    any = true;
                }
            }
            for alias in response.removed_resources.iter().filter_map(|a| Alias::parse(a)) {
                if let Some(s) = subs.get_mut(&alias) {
                    (s.answer, s.since) = (Answer::Absent, now);
                    any = true;
                }
            }
        }
        if any {
            self.answers.send_modify(|n| *n += 1);
        }
    }

    /// Runs for the life of the process: advances the usage clock and releases what is no longer used — a found
    /// destination whose Services no request has routed to for the idle period, a negative answer past its time,
    /// a lookup never answered.
    /// `used` gives the usage tick of a Service (`namespace/name`) in the live snapshot (`None`: not held).
    pub async fn run_sweeper(self: std::sync::Arc<Self>, used: impl Fn(&str) -> Option<u64>) {
        let period = (self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
        let idle_ticks = (self.idle.as_millis() / period.as_millis()).max(1) as u64;
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now_tick = TICK.fetch_add(1, Ordering::Relaxed) + 1;
            if self.sweep(&used, now_tick, idle_ticks) {
                self.changed.notify_one();
            }
        }
    }

    /// One sweep; true if something was released.
    fn sweep(&self, used: &dyn Fn(&str) -> Option<u64>, now_tick: u64, idle_ticks: u64) -> bool {
        let now = Instant::now();
        let mut subs = self.subscriptions.lock().expect("subscriptions lock");
        let before = subs.len();
        subs.retain(|_, s| match &s.answer {
            Answer::Absent => now.duration_since(s.since) < self.negative_ttl,
            Answer::Pending => now.duration_since(s.since) < self.idle,
            Answer::Found(services) => {
                services.iter().any(|name| used(name).is_some_and(|tick| now_tick.saturating_sub(tick) < idle_ticks))
            }
        });
        subs.len() != before
    }

    /// The subscriptions with their answers, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let subs = self.subscriptions.lock().expect("subscriptions lock");
        let mut rows: Vec<serde_json::Value> = subs
            .iter()
            .map(|(alias, s)| {
                let (answer, services) = match &s.answer {
                    Answer::Pending => ("pending", Vec::new()),
                    Answer::Found(services) => ("found", services.clone()),
                    Answer::Absent => ("absent", Vec::new()),
                };
                serde_json::json!({"name": alias.name(), "answer": answer, "services": services,
                    "ageSeconds": s.since.elapsed().as_secs()})
            })
            .collect();
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        serde_json::json!({"connected": self.connected.load(Ordering::Relaxed), "subscriptions": rows})
    }
}

/// While it lives, the stream counts as up.
pub struct Connected<'a>(&'a OnDemand);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.set_connected(false);
    }
}

fn drop_oldest_negative(subs: &mut HashMap<Alias, Subscription>) {
    let oldest = subs.iter().filter(|(_, s)| s.answer == Answer::Absent).min_by_key(|(_, s)| s.since);
    if let Some(alias) = oldest.map(|(a, _)| a.clone()) {
        subs.remove(&alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;

    fn ip(s: &str) -> Alias {
        Alias::Ip(s.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_wait_for_answers_and_keep_them() {
        let od = std::sync::Arc::new(OnDemand::new(Duration::from_secs(60), Duration::from_secs(30)));
        assert_eq!(od.discover(ip("10.96.0.1")).await, Discovered::Unavailable, "not connected: no wait");
        od.set_connected(true);
        // A lookup subscribes and waits; the answer (the Service carrying the alias) ends the wait.
        let waiting = tokio::spawn({
            let od = od.clone();
            async move { od.discover(ip("10.96.0.1")).await }
        });
        tokio::task::yield_now().await;
        let mut sent = HashSet::new();
        assert_eq!(od.changes(&mut sent), (vec!["ip/10.96.0.1".to_string()], vec![]));
        od.answered(&DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "demo/api".into(),
                aliases: vec!["ip/10.96.0.1".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(waiting.await.unwrap(), Discovered::Found);
        assert_eq!(od.discover(ip("10.96.0.1")).await, Discovered::Found, "held");
        // A negative answer, then cached.
        let waiting = tokio::spawn({
            let od = od.clone();
            async move { od.discover(ip("192.0.2.1")).await }
        });
        tokio::task::yield_now().await;
        od.answered(&DeltaDiscoveryResponse { removed_resources: vec!["ip/192.0.2.1".into()], ..Default::default() });
        assert_eq!(waiting.await.unwrap(), Discovered::Absent { cached: false });
        assert_eq!(od.discover(ip("192.0.2.1")).await, Discovered::Absent { cached: true });
        // No answer within the wait.
        let started = tokio::time::Instant::now();
        assert_eq!(od.discover(ip("10.96.0.2")).await, Discovered::Unavailable);
        assert_eq!(started.elapsed(), FIRST_CALL_WAIT);
        // Fail closed only inside the mesh's ranges and without a negative answer.
        od.set_mesh_cidrs(vec!["10.96.0.0/12".parse().unwrap(), "192.0.2.0/24".parse().unwrap()]);
        assert!(od.refuses("10.96.0.2".parse().unwrap()));
        assert!(!od.refuses("192.0.2.1".parse().unwrap()), "the control plane said nothing is there");
        assert!(!od.refuses("203.0.113.1".parse().unwrap()), "outside the mesh");
        // The sweep: the negative answer expires, the found one goes when its Service is unused (here: not held).
        let (subscribe, unsubscribe) = od.changes(&mut sent);
        assert_eq!((subscribe.len(), unsubscribe.len()), (2, 0));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(od.sweep(&|_| None, 10, 4));
        let (subscribe, mut unsubscribe) = od.changes(&mut sent);
        unsubscribe.sort();
        assert!(subscribe.is_empty());
        assert_eq!(unsubscribe, ["ip/10.96.0.1", "ip/192.0.2.1"], "the unanswered one stays until the idle period");
        // Released and looked up again before the stream saw the release: sent again all the same.
        od.subscriptions
            .lock()
            .unwrap()
            .insert(ip("10.96.0.9"), Subscription { answer: Answer::Absent, since: Instant::now(), sent: true });
        let _ = od.changes(&mut sent);
        od.subscriptions.lock().unwrap().remove(&ip("10.96.0.9"));
        od.subscriptions
            .lock()
            .unwrap()
            .insert(ip("10.96.0.9"), Subscription { answer: Answer::Pending, since: Instant::now(), sent: false });
        assert_eq!(od.changes(&mut sent).0, ["ip/10.96.0.9"]);
        // Down: what is pending is dropped, nothing waits.
        od.set_connected(false);
        assert_eq!(od.discover(ip("10.96.0.3")).await, Discovered::Unavailable);
    }
}
