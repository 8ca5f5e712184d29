//! `aisle trace`: a synthetic request trace of a wedding-planning app, for `aisle replay`.
//!
//! Real traffic is what should be replayed, but a demo, the README's evidence and regression
//! checks need a trace anyone can regenerate, so this one is fully determined by its seed: a PCG
//! generator (`rand_pcg::Pcg64`, whose output is fixed by its specification), Zipf weights
//! rounded to integers (sampling is integer arithmetic) and integer timestamps. The same
//! `--seed`, `--requests` and `--duration` give the same file, byte for byte, for a given
//! `Cargo.lock`.
//!
//! The traffic is made of visits, because that is where an API cache's hits come from: people
//! come back to the same views within minutes, and many couples share a market, a season and a
//! budget. A visit belongs to a couple with a profile (a market written their way: `NYC`,
//! `new york`, ` Brooklyn`, `Brooklyn, NY`, `Austin, TX`...; a wedding date; a budget range; a
//! wedding id; a chat model), starts at a uniform time in the window, opens on the dashboard and
//! then does [`SESSION_EVENTS`] things [`THINK_MS`] apart, drawn from [`EVENTS`]:
//! - the dashboard: the wedding's timeline, the weather for its city and date, and the
//!   assistant's overview for the couple (`POST /api/ai/recommendations`), then the timeline
//!   polled every [`TIMELINE_POLL_MS`] while the page stays open ([`DASHBOARD_DWELL_MS`]);
//! - vendor searches: vendor types by popularity (sometimes capitalised), the couple's city as
//!   in their profile or typed another way, budgets typed as amounts around popular thousands
//!   (`5200`), an unkeyed `utm_source` now and then, parameters in any order;
//! - vendor details (popular vendors, and ones seen before in the visit) and, rarely, a vendor's
//!   update (POST, never cached);
//! - questions to the assistant: a Zipf-popular set of suggested questions typed with case and
//!   whitespace variants, plus one-off questions; every body carries volatile `request_id`,
//!   `session` and `client` fields that must not split the cache;
//! - chat completions (`POST /v1/chat/completions`): Zipf-popular prompts plus one-off ones,
//!   the model of the couple's plan, `stream` on the web app, every object's keys in a random
//!   order, and per-user `user` / `metadata` / `stream_options`; each carries its app's API key
//!   (`Authorization: Bearer ...`, one key per app: [`chat_api_key`]), as every OpenAI-style
//!   call does, so the chat rule's `authorization` setting decides what is shared;
//! - the guest list, which no rule matches (the default route).
//!
//! [`PARTNER_SHARE`] of visits are the partner or planner of an earlier couple (same profile),
//! and [`DAY_OF_SHARE`] are someone working one of today's weddings, polling its timeline (the
//! trace is a Saturday afternoon). Popularity is Zipf with the exponents in [`Popularity`].
//! Every knob is a `pub const` here, so a reader of a hit ratio can see what produced it. Lines
//! are written in time order, timestamps as RFC 3339 with milliseconds.

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::time::Duration;

/// The trace's first instant: Saturday 2 May 2026, 14:00 UTC.
pub const START_MS: i64 = 1_777_730_400_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Options {
    pub requests: usize,
    pub seed: u64,
    /// Visits start uniformly within this window; requests after its end are not written.
    pub duration: Duration,
    /// Unix ms of the window's start.
    pub start_ms: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            requests: 20_000,
            seed: 42,
            duration: Duration::from_secs(2 * 3600),
            start_ms: START_MS,
        }
    }
}

/// Things a visit does after opening on the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Dashboard,
    Search,
    Details,
    Ask,
    Chat,
    VendorUpdate,
    Guests,
}

/// How often each happens (weights).
const EVENTS: &[(Event, u64)] = &[
    (Event::Dashboard, 200),
    (Event::Search, 300),
    (Event::Details, 130),
    (Event::Ask, 150),
    (Event::Chat, 150),
    (Event::VendorUpdate, 10),
    (Event::Guests, 60),
];

/// Events per visit, the dashboard included.
pub const SESSION_EVENTS: RangeInclusive<u32> = 10..=60;

/// Share of visits by someone working one of today's weddings (planner, venue, photographer,
/// family), who keeps its timeline open for [`DAY_OF_MINUTES`], polling every
/// [`TIMELINE_POLL_MS`]: the trace is a Saturday afternoon.
pub const DAY_OF_SHARE: f64 = 0.04;
pub const DAY_OF_MINUTES: RangeInclusive<u64> = 10..=60;
/// Weddings taking place today, with ids from [`DAY_OF_FIRST_ID`].
pub const WEDDINGS_TODAY: u64 = 12;
pub const DAY_OF_FIRST_ID: u64 = 9001;

/// Time between two events of a visit.
pub const THINK_MS: RangeInclusive<u64> = 2_000..=20_000;

/// Visits by the partner or planner of an earlier couple (same wedding, same profile).
pub const PARTNER_SHARE: f64 = 0.3;

/// How long a dashboard view stays open before the next event's think time.
pub const DASHBOARD_DWELL_MS: RangeInclusive<u64> = 5_000..=120_000;

/// The dashboard polls the wedding's timeline this often while open.
pub const TIMELINE_POLL_MS: u64 = 30_000;

/// What the dashboard asks the assistant on every view.
const OVERVIEW: (&str, &str) = ("overview", "What should we focus on next?");

/// Zipf exponents (rank k is drawn with weight 1/k^s): how concentrated popularity is.
pub struct Popularity;

impl Popularity {
    /// Over [`MARKETS`] (23): the first market gets about 40% of couples.
    pub const MARKET: f64 = 1.4;
    /// Over vendor types (8).
    pub const VENDOR_TYPE: f64 = 1.2;
    /// Over 300 vendors' detail pages.
    pub const VENDOR: f64 = 1.2;
    /// Over the assistant's suggested questions (20).
    pub const QUESTION: f64 = 1.3;
    /// Over the budget ranges of the app's dropdown (5).
    pub const BUDGET_RANGE: f64 = 1.4;
    /// Over the chat feature's canned prompts (20).
    pub const PROMPT: f64 = 1.3;
    /// Over a vendor type's popular budgets (in thousands).
    pub const BUDGET: f64 = 1.2;
    /// Over the ways a market is written, and other small lists.
    pub const VARIANT: f64 = 1.0;
}

/// Vendor detail pages, by id from 1000.
const VENDOR_PAGES: usize = 300;

/// Share of assistant questions and chat prompts typed from scratch (never shared).
pub const ONE_OFF_QUESTIONS: f64 = 0.06;
pub const ONE_OFF_PROMPTS: f64 = 0.08;

/// Markets in popularity order, each with the ways people write it (most common first). The
/// last ones are not in the `market` table: they fall back to their state.
#[rustfmt::skip]
const MARKETS: &[&[&str]] = &[
    &["NYC", "New York", "new york", "Brooklyn", " Brooklyn", "Brooklyn, NY", "Manhattan", "new york city", "NEW YORK ", "Hoboken, NJ"],
    &["Los Angeles", "LA", "los angeles", "Santa Monica", "Pasadena, CA", "Malibu"],
    &["Austin", "Austin, TX", "austin", "AUSTIN "],
    &["Chicago", "chicago", "Chicago, IL", "Evanston"],
    &["San Francisco", "SF", "san francisco", "Oakland", "Berkeley, CA"],
    &["Miami", "Miami Beach", "miami", "Fort Lauderdale"],
    &["Napa", "Sonoma", "napa", "Healdsburg, CA"],
    &["Nashville", "nashville", "Nashville, TN"],
    &["Washington DC", "DC", "washington dc", "Alexandria, VA"],
    &["Seattle", "seattle", "Bellevue, WA"],
    &["Boston", "boston", "Cambridge, MA"],
    &["Denver", "Boulder", "denver"],
    &["Atlanta", "atlanta", "Atlanta, GA"],
    &["Dallas", "Fort Worth", "dallas"],
    &["Charleston", "charleston", "Charleston, SC"],
    &["Savannah", "Savannah, GA"],
    &["New Orleans", "new orleans"],
    &["Philadelphia", "philadelphia"],
    &["San Diego", "La Jolla"],
    &["Scottsdale", "Phoenix"],
    &["Round Rock, TX", "San Marcos, TX"],
    &["Asheville, NC", "asheville, nc"],
    &["Bar Harbor, ME", "Portland, ME"],
];

/// Vendor types in popularity order, with the thousands people budget for them.
#[rustfmt::skip]
const VENDORS: &[(&str, &[u64])] = &[
    ("photographer", &[4, 3, 5, 6, 2]),
    ("venue", &[15, 10, 20, 12, 25, 8]),
    ("florist", &[2, 3, 1, 4]),
    ("caterer", &[10, 8, 12, 15, 6]),
    ("dj", &[1, 2, 3]),
    ("planner", &[5, 3, 8, 10]),
    ("videographer", &[3, 4, 2, 5]),
    ("baker", &[1, 2]),
];

/// Suggested questions of the AI assistant, in popularity order, with their `query.type`.
#[rustfmt::skip]
const QUESTIONS: &[(&str, &str)] = &[
    ("venue", "What are the best outdoor venues for our wedding?"),
    ("budget", "How should we split our wedding budget?"),
    ("photographer", "Which photographers fit our style and budget?"),
    ("timeline", "When should we book each vendor?"),
    ("venue", "Which venues can host 150 guests?"),
    ("florist", "Which flowers are in season for our date?"),
    ("catering", "What menu works for our wedding?"),
    ("budget", "Where can we save money without it showing?"),
    ("music", "Should we hire a DJ or a band?"),
    ("timeline", "Create a planning checklist for the next 12 months"),
    ("catering", "Find caterers with vegan options"),
    ("venue", "Suggest rustic barn venues nearby"),
    ("photographer", "Do we need a second shooter?"),
    ("florist", "Suggest centerpieces for a garden wedding"),
    ("timeline", "What should happen the week before the wedding?"),
    ("music", "Suggest songs for the first dance"),
    ("budget", "What is a typical wedding budget here?"),
    ("venue", "Find waterfront venues with catering included"),
    ("catering", "How much does catering cost per guest?"),
    ("florist", "How much do bridal bouquets cost?"),
];

/// Budget ranges the app's dropdown offers, in popularity order.
const BUDGET_RANGES: &[(u64, u64)] = &[
    (20_000, 35_000),
    (35_000, 50_000),
    (10_000, 20_000),
    (50_000, 80_000),
    (80_000, 150_000),
];

/// Canned prompts of the chat feature, in popularity order.
#[rustfmt::skip]
const PROMPTS: &[&str] = &[
    "Write a short, warm welcome message for our wedding website.",
    "Draft a polite email asking a photographer about availability.",
    "Suggest five creative hashtag ideas for our wedding.",
    "Write a maid of honor toast outline, about two minutes long.",
    "Draft a thank-you note for a wedding gift.",
    "Explain the difference between a wedding planner and a coordinator.",
    "Suggest a rain plan for an outdoor ceremony.",
    "Write a reminder text for guests to RSVP.",
    "List questions to ask a venue before signing a contract.",
    "Suggest a seating chart strategy for divorced parents.",
    "Write a best man toast opener that is funny but kind.",
    "Draft an email asking a caterer for a tasting.",
    "Suggest unique wedding favor ideas under five dollars.",
    "Explain what a first look is and its pros and cons.",
    "Write vows that are sweet and under one minute.",
    "Draft a day-of timeline for a 4pm ceremony.",
    "Suggest ways to include a late grandparent in the ceremony.",
    "Write a message declining a plus-one request politely.",
    "List what goes into a wedding day emergency kit.",
    "Suggest a signature cocktail for a fall wedding.",
];

const SYSTEM_PROMPT: &str =
    "You are Aisle Assistant, a friendly wedding-planning helper. Answer concisely.";

const HOST: &str = "127.0.0.1:8080";

/// Writes the trace to `out`, one JSON object per line, in time order.
pub fn write_trace(opts: &Options, out: &mut impl Write) -> io::Result<()> {
    for (_, line) in generate(opts) {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The trace as (unix ms, line), in time order; exactly `opts.requests` lines.
pub fn generate(opts: &Options) -> Vec<(i64, String)> {
    let mut g = Generator::new(opts.seed);
    let span = (opts.duration.as_millis() as u64).max(1);
    let mut out: Vec<(i64, String)> = Vec::with_capacity(opts.requests);
    let mut couples: Vec<Profile> = Vec::new();
    // Every visit writes at least its first request (it starts inside the window), so this loop
    // runs at most `opts.requests` times.
    while out.len() < opts.requests {
        let start = g.rng.random_range(0..span);
        if g.rng.random_bool(DAY_OF_SHARE) {
            // Someone working today's wedding keeps its timeline open: a poll every 30 s.
            let wedding = DAY_OF_FIRST_ID + g.rng.random_range(0..WEDDINGS_TODAY);
            let minutes = g.rng.random_range(DAY_OF_MINUTES);
            let polls = minutes * 60_000 / TIMELINE_POLL_MS;
            for i in 0..=polls {
                let t = start + i * TIMELINE_POLL_MS;
                if out.len() == opts.requests || t >= span {
                    break;
                }
                let at = opts.start_ms + t as i64;
                let req = Req::get(format!("/api/weddings/w-{wedding}/timeline"), None);
                out.push((at, req.line(at)));
            }
            continue;
        }
        let mut visit = g.visit(&mut couples);
        let events = g.rng.random_range(SESSION_EVENTS);
        let mut t = start;
        for i in 0..events {
            if t >= span {
                break;
            }
            let event = if i == 0 {
                Event::Dashboard
            } else {
                EVENTS[g.event.sample(&mut g.rng)].0
            };
            let (requests, dwell) = g.event(event, &mut visit);
            for (offset, req) in requests {
                if out.len() == opts.requests || t + offset >= span {
                    break;
                }
                let at = opts.start_ms + (t + offset) as i64;
                out.push((at, req.line(at)));
            }
            t += dwell + g.rng.random_range(THINK_MS);
        }
    }
    out.sort_by_key(|(at, _)| *at);
    out
}

/// Zipf weights over `n` ranks (rank k from 1 weighs 10^9 / k^s), rounded to integers.
fn zipf(n: usize, s: f64) -> WeightedIndex<u64> {
    let weights = (1..=n).map(|k| (1e9 / (k as f64).powf(s)).round().max(1.0) as u64);
    WeightedIndex::new(weights).expect("non-empty, positive weights")
}

/// A couple's wedding, as their profile says.
#[derive(Debug, Clone)]
struct Profile {
    wedding: usize,
    market: usize,
    /// The city as written in the profile.
    city: &'static str,
    date: String,
    budget: (u64, u64),
    /// The plan's chat model.
    model: &'static str,
}

/// One visit: a profile, the app used, and what was typed or seen so far.
struct Visit {
    profile: Profile,
    user: u64,
    session: String,
    app: &'static str,
    /// Budgets typed per vendor type (a repeated search repeats the amount).
    budgets: HashMap<usize, u64>,
    viewed: Vec<usize>,
}

/// The API key an app's chat calls carry (`Authorization: Bearer <key>`): one per app (its
/// project key at the AI vendor), not per user. Made up, and fixed so the trace stays determined
/// by its seed.
pub fn chat_api_key(app: &str) -> String {
    format!("sk-trace-{app}-7f3a9c2e51d04b86")
}

/// One request to write.
struct Req {
    method: &'static str,
    path: String,
    query: Option<String>,
    body: Option<String>,
    /// `Authorization` value.
    authorization: Option<String>,
}

impl Req {
    fn get(path: String, query: Option<String>) -> Req {
        Req {
            method: "GET",
            path,
            query,
            body: None,
            authorization: None,
        }
    }

    fn post(path: &str, body: String) -> Req {
        Req {
            method: "POST",
            path: path.to_string(),
            query: None,
            body: Some(body),
            authorization: None,
        }
    }

    fn with_authorization(mut self, value: String) -> Req {
        self.authorization = Some(value);
        self
    }

    fn line(&self, at_ms: i64) -> String {
        let timestamp = chrono::DateTime::from_timestamp_millis(at_ms)
            .expect("a time within chrono's range")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut line = format!(
            "{{\"timestamp\":\"{timestamp}\",\"method\":\"{}\",\"path\":{}",
            self.method,
            Value::from(self.path.as_str())
        );
        if let Some(q) = &self.query {
            line.push_str(&format!(",\"query\":{}", Value::from(q.as_str())));
        }
        line.push_str(&format!(",\"headers\":{{\"host\":\"{HOST}\""));
        if let Some(auth) = &self.authorization {
            line.push_str(&format!(
                ",\"authorization\":{}",
                Value::from(auth.as_str())
            ));
        }
        match &self.body {
            Some(body) => line.push_str(&format!(
                ",\"content-type\":\"application/json\"}},\"body\":{body}}}"
            )),
            None => line.push_str("}}"),
        }
        line
    }
}

struct Generator {
    rng: Pcg64,
    event: WeightedIndex<u64>,
    market: WeightedIndex<u64>,
    vendor: WeightedIndex<u64>,
    vendor_id: WeightedIndex<u64>,
    question: WeightedIndex<u64>,
    budget: WeightedIndex<u64>,
    prompt: WeightedIndex<u64>,
    month: WeightedIndex<u64>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Generator {
            rng: Pcg64::seed_from_u64(seed),
            event: WeightedIndex::new(EVENTS.iter().map(|(_, w)| *w)).expect("weights"),
            market: zipf(MARKETS.len(), Popularity::MARKET),
            vendor: zipf(VENDORS.len(), Popularity::VENDOR_TYPE),
            vendor_id: zipf(VENDOR_PAGES, Popularity::VENDOR),
            question: zipf(QUESTIONS.len(), Popularity::QUESTION),
            budget: zipf(BUDGET_RANGES.len(), Popularity::BUDGET_RANGE),
            prompt: zipf(PROMPTS.len(), Popularity::PROMPT),
            // Wedding season: June, September and October are the busiest months.
            month: WeightedIndex::new([2u64, 2, 4, 6, 10, 14, 9, 10, 15, 15, 5, 3])
                .expect("weights"),
        }
    }

    /// One item of `items`, the first most often.
    fn variant<T: Copy>(&mut self, items: &[T]) -> T {
        items[zipf(items.len(), Popularity::VARIANT).sample(&mut self.rng)]
    }

    fn hex(&mut self, digits: usize) -> String {
        let v: u64 = self.rng.random();
        format!("{v:016x}")[..digits.min(16)].to_string()
    }

    fn wedding_date(&mut self) -> String {
        let year = if self.rng.random_bool(0.6) {
            2026
        } else {
            2027
        };
        let month = self.month.sample(&mut self.rng) + 1;
        let day = self.rng.random_range(1..=28);
        format!("{year}-{month:02}-{day:02}")
    }

    /// A new visit: an earlier couple's partner or planner, or a new couple.
    fn visit(&mut self, couples: &mut Vec<Profile>) -> Visit {
        let profile = match couples.choose(&mut self.rng) {
            Some(p) if self.rng.random_bool(PARTNER_SHARE) => p.clone(),
            _ => {
                let market = self.market.sample(&mut self.rng);
                let p = Profile {
                    wedding: couples.len() + 1,
                    market,
                    city: self.variant(MARKETS[market]),
                    date: self.wedding_date(),
                    budget: BUDGET_RANGES[self.budget.sample(&mut self.rng)],
                    model: if self.rng.random_bool(0.85) {
                        "gpt-4o-mini"
                    } else {
                        "gpt-4o"
                    },
                };
                couples.push(p.clone());
                p
            }
        };
        Visit {
            profile,
            user: self.rng.random_range(1..1_000_000),
            session: format!("s-{}", self.hex(12)),
            app: self.variant(&["ios", "web", "android"]),
            budgets: HashMap::new(),
            viewed: Vec::new(),
        }
    }

    /// The requests of one event, each with its offset from the event's start (ms), and how
    /// long the page stays open before the next think time starts.
    fn event(&mut self, event: Event, v: &mut Visit) -> (Vec<(u64, Req)>, u64) {
        if event == Event::Dashboard {
            return self.dashboard(v);
        }
        let req = match event {
            Event::Dashboard => unreachable!("handled above"),
            Event::Search => Req::get("/api/vendors/search".into(), Some(self.search_query(v))),
            Event::Details => {
                let id = match v.viewed.choose(&mut self.rng) {
                    Some(&id) if self.rng.random_bool(0.4) => id,
                    _ => 1000 + self.vendor_id.sample(&mut self.rng),
                };
                v.viewed.push(id);
                Req::get(format!("/api/vendors/{id}"), None)
            }
            Event::Ask => {
                let (kind, content) = if self.rng.random_bool(ONE_OFF_QUESTIONS) {
                    // A one-off question typed by hand: nothing can share it.
                    let n = self.hex(6);
                    ("venue", format!("Is venue {n} good for a small wedding?"))
                } else {
                    self.question()
                };
                Req::post("/api/ai/recommendations", self.ai_body(v, kind, content))
            }
            Event::Chat => Req::post("/v1/chat/completions", self.chat_body(v))
                .with_authorization(format!("Bearer {}", chat_api_key(v.app))),
            Event::VendorUpdate => {
                let id = 1000 + self.vendor_id.sample(&mut self.rng);
                let body = json!({"availability": [self.wedding_date()]}).to_string();
                Req::post(&format!("/api/vendors/{id}"), body)
            }
            Event::Guests => Req::get(
                "/api/guests".into(),
                Some(format!("weddingId=w-{}", v.profile.wedding)),
            ),
        };
        (vec![(0, req)], 0)
    }

    /// A dashboard view: the timeline, the weather and the assistant's overview, a few tens of
    /// milliseconds apart; then the page stays open for [`DASHBOARD_DWELL_MS`], polling the
    /// timeline every [`TIMELINE_POLL_MS`] (the planner UI's polling that `rules/timeline.toml`
    /// describes).
    fn dashboard(&mut self, v: &Visit) -> (Vec<(u64, Req)>, u64) {
        let timeline = format!("/api/weddings/w-{}/timeline", v.profile.wedding);
        let weather = form_urlencoded::Serializer::new(String::new())
            .append_pair("city", v.profile.city)
            .append_pair("date", &v.profile.date)
            .finish();
        let overview = self.ai_body(v, OVERVIEW.0, OVERVIEW.1.to_string());
        let mut out = vec![
            (0, Req::get(timeline.clone(), None)),
            (40, Req::get("/api/weather".into(), Some(weather))),
            (80, Req::post("/api/ai/recommendations", overview)),
        ];
        let dwell = self.rng.random_range(DASHBOARD_DWELL_MS);
        let polls = dwell / TIMELINE_POLL_MS;
        out.extend((1..=polls).map(|i| (i * TIMELINE_POLL_MS, Req::get(timeline.clone(), None))));
        (out, dwell)
    }

    fn search_query(&mut self, v: &mut Visit) -> String {
        let city = match self.rng.random_range(0..20) {
            0..=14 => v.profile.city,
            15..=18 => self.variant(MARKETS[v.profile.market]),
            _ => {
                let market = self.market.sample(&mut self.rng);
                self.variant(MARKETS[market])
            }
        };
        let vendor_index = self.vendor.sample(&mut self.rng);
        let (vendor, budgets) = VENDORS[vendor_index];
        let vendor = if self.rng.random_bool(0.15) {
            let mut c = vendor.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        } else {
            vendor.to_string()
        };
        // Typed amounts: a popular thousand plus 0..900 in steps of 100; the same visit
        // searching the same vendor type again types the same amount.
        let typed = budgets[zipf(budgets.len(), Popularity::BUDGET).sample(&mut self.rng)] * 1000
            + self.rng.random_range(0..10u64) * 100;
        let budget = *v.budgets.entry(vendor_index).or_insert(typed);
        let mut pairs = vec![
            ("location", city.to_string()),
            ("vendorType", vendor),
            ("budget", budget.to_string()),
        ];
        if self.rng.random_bool(0.1) {
            let src = *["newsletter", "instagram", "pinterest"]
                .choose(&mut self.rng)
                .expect("non-empty");
            pairs.push(("utm_source", src.to_string()));
        }
        if self.rng.random_bool(0.3) {
            pairs.shuffle(&mut self.rng);
        }
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pairs {
            ser.append_pair(k, v);
        }
        ser.finish()
    }

    /// A suggested question as typed: mostly as suggested, sometimes lowercased, shouted or with
    /// stray spaces (the `text` normalizer folds all of these).
    fn question(&mut self) -> (&'static str, String) {
        let (kind, q) = QUESTIONS[self.question.sample(&mut self.rng)];
        let typed = match self.rng.random_range(0..20) {
            0..=9 => q.to_string(),
            10..=13 => q.to_lowercase(),
            14..=15 => format!("  {q} "),
            16..=17 => q.replace(' ', "  "),
            18 => q.to_uppercase(),
            _ => format!("{}\n", q.to_lowercase()),
        };
        (kind, typed)
    }

    fn ai_body(&mut self, v: &Visit, kind: &str, content: String) -> String {
        let p = &v.profile;
        json!({
            "request_id": format!("req-{}", self.hex(16)),
            "session": v.session,
            "client": {"app": v.app, "version": "4.2.0"},
            "query": {"type": kind, "content": content},
            "weddingContext": {
                "location": {"city": p.city},
                "weddingDate": p.date,
                "budgetRange": {"min": p.budget.0, "max": p.budget.1},
            },
        })
        .to_string()
    }

    fn chat_body(&mut self, v: &Visit) -> String {
        let prompt = if self.rng.random_bool(ONE_OFF_PROMPTS) {
            let (who, what) = (self.hex(5), self.hex(4));
            format!("Write a thank-you note to {who} for the {what} gift.")
        } else {
            PROMPTS[self.prompt.sample(&mut self.rng)].to_string()
        };
        let mut body = json!({
            "model": v.profile.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0.7,
            "max_tokens": 400,
            "user": format!("u-{}", v.user),
            "metadata": {"request_id": self.hex(16), "session": v.session, "feature": "assistant"},
        });
        if v.app == "web" {
            body["stream"] = true.into();
            if v.user.is_multiple_of(2) {
                body["stream_options"] = json!({"include_usage": true});
            }
        }
        let mut out = String::new();
        self.write_shuffled(&body, &mut out);
        out
    }

    /// Writes `v` as JSON with every object's keys in a random order (clients differ).
    fn write_shuffled(&mut self, v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.shuffle(&mut self.rng);
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::from(k.as_str()).to_string());
                    out.push(':');
                    self.write_shuffled(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.write_shuffled(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::replay::parse_line;

    fn generate(requests: usize, seed: u64) -> String {
        let mut out = Vec::new();
        let opts = Options {
            requests,
            seed,
            ..Options::default()
        };
        write_trace(&opts, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn same_seed_same_trace_other_seed_other_trace() {
        let a = generate(500, 7);
        assert_eq!(a, generate(500, 7));
        assert_ne!(a, generate(500, 8));
        assert_eq!(a.lines().count(), 500);
    }

    #[test]
    fn every_line_replays_and_time_is_ordered_within_the_window() {
        let trace = generate(2000, 42);
        let mut last = 0;
        let mut kinds = std::collections::BTreeMap::new();
        for line in trace.lines() {
            let r = parse_line(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(r.at_ms >= last, "time order");
            last = r.at_ms;
            assert!((START_MS..START_MS + 2 * 3600 * 1000).contains(&r.at_ms));
            if r.method == http::Method::POST {
                let body = r.body.as_deref().unwrap_or_else(|| panic!("{line}"));
                assert!(
                    serde_json::from_str::<serde_json::Value>(body).is_ok(),
                    "{line}"
                );
            }
            *kinds
                .entry(r.path.split('/').nth(2).unwrap_or("").to_string())
                .or_insert(0) += 1;
        }
        // Every kind of request shows up in 2000 draws.
        for k in ["vendors", "weddings", "weather", "ai", "chat", "guests"] {
            assert!(kinds.get(k).copied().unwrap_or(0) > 0, "{k}: {kinds:?}");
        }
    }

    #[test]
    fn variants_the_normalizers_are_for_are_present() {
        let trace = generate(3000, 42);
        for needle in [
            "location=NYC",
            "location=new+york",
            "location=+Brooklyn",
            "location=Austin%2C+TX",
            "vendorType=Photographer",
            "utm_source=",
            "\"request_id\":\"req-",
            "\"session\":\"s-",
            "\"stream\":true",
            "\"stream_options\"",
            "\"authorization\":\"Bearer sk-trace-web-",
            "\"authorization\":\"Bearer sk-trace-ios-",
        ] {
            assert!(trace.contains(needle), "{needle}");
        }
        // Chat bodies come with their keys in different orders.
        let firsts: std::collections::BTreeSet<&str> = trace
            .lines()
            .filter(|l| l.contains("/v1/chat/completions"))
            .filter_map(|l| l.split("\"body\":{\"").nth(1)?.split('"').next())
            .collect();
        assert!(firsts.len() > 3, "{firsts:?}");
    }
}
