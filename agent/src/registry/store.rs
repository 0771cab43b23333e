//! The per-model families, held in servescope's own storage and rendered straight from it.
//!
//! Per-model series are nearly all of a scrape: at 1,000 models, 22,000 of about 23,000 samples
//! (bench/RESULTS.md). Kept by the prometheus crate, every scrape cloned each series (label strings,
//! bucket vectors) into `proto` structs through `Registry::gather`, sorted them, formatted them and
//! threw them away: most of the render time, and MBs of short-lived allocations that glibc kept as
//! resident memory. A [`StoredFamily`] keeps per series its label values and plain numbers;
//! `/metrics` formats them in place (`exposition::text::encode_stored_family`, and the TorchServe
//! encoder for TorchServe's families), and [`StoredFamily::proto`] still gives the `proto` form to
//! the code and tests that want it. Counting rules (a histogram's `v <= bound`), series order and
//! text are those of `prometheus::{CounterVec, HistogramVec}`; the tests hold both to the same
//! output. Not a crate: prometheus-client and metrics-exporter-prometheus format on their own, not
//! as TorchServe/`TextEncoder` do byte for byte.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};

/// What a family's series hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// One monotonic value.
    Counter,
    /// Observations in buckets with these ascending upper bounds (`+Inf` implied), count and sum.
    Histogram(&'static [f64]),
}

/// Writes into `key` the label values, each length-prefixed: an injective key whatever bytes a value
/// holds, built in a reused buffer so that a lookup needs no allocation.
pub fn label_key(key: &mut Vec<u8>, values: &[&str]) {
    key.clear();
    for value in values {
        key.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
        key.extend_from_slice(value.as_bytes());
    }
}

/// One series of one family ([`StoredFamily::series_id`]); the family it came from is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesId {
    /// The family's address, which no other live family shares.
    family: usize,
    index: usize,
}

/// A family with a fixed label set. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct StoredFamily {
    inner: Arc<Inner>,
}

struct Inner {
    name: &'static str,
    help: String,
    kind: Kind,
    /// Label names in the order the caller passes values.
    labels: Box<[&'static str]>,
    /// Label names sorted, as every Prometheus series lists them, and for each its index in `labels`.
    sorted: Box<[&'static str]>,
    sorted_index: Box<[usize]>,
    series: Mutex<Series>,
}

#[derive(Default)]
struct Series {
    /// Every series, in the order they appeared (series are never removed).
    entries: Vec<Entry>,
    /// Index into `entries`, keyed by the label values in the caller's order, each length-prefixed
    /// (an injective key, whatever bytes a value holds), so a lookup needs no allocation.
    by_key: HashMap<Box<[u8]>, usize, foldhash::fast::RandomState>,
    /// Scratch for building a lookup key.
    key: Vec<u8>,
    /// `entries` indices in each [`Order`], sorted when a scrape finds them stale (new series are
    /// rare after warm-up; sorting 1,000 label sets every scrape was a tenth of the render).
    gather_order: Vec<usize>,
    declared_order: Vec<usize>,
}

struct Entry {
    /// Label values in the caller's order.
    values: Box<[String]>,
    /// Histograms: observations per bucket (not cumulative), one slot per bound.
    buckets: Box<[u64]>,
    count: u64,
    /// A counter's value; a histogram's sum.
    sum: f64,
}

/// One series as an encoder sees it.
pub struct SeriesView<'a> {
    family: &'a Inner,
    entry: &'a Entry,
}

impl<'a> SeriesView<'a> {
    /// `(name, value)` of each label, names sorted (the Prometheus text's order).
    pub fn sorted_labels(&self) -> impl Iterator<Item = (&'static str, &'a str)> + '_ {
        self.family
            .sorted
            .iter()
            .zip(self.family.sorted_index.iter())
            .map(|(name, &i)| (*name, self.entry.values[i].as_str()))
    }

    /// Label values in the family's own label order (TorchServe's, for its families).
    pub fn values(&self) -> &'a [String] {
        &self.entry.values
    }

    /// A counter's value; a histogram's sum.
    pub fn value(&self) -> f64 {
        self.entry.sum
    }

    /// A histogram's observations.
    pub fn count(&self) -> u64 {
        self.entry.count
    }

    /// A histogram's cumulative counts, one per bound (the `+Inf` bucket is [`count`](Self::count)).
    pub fn cumulative(&self) -> impl Iterator<Item = u64> + '_ {
        self.entry.buckets.iter().scan(0u64, |acc, n| {
            *acc += n;
            Some(*acc)
        })
    }
}

/// The order series are listed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// By label values, label names sorted: `prometheus::Registry::gather`'s order.
    Gather,
    /// By label values in the family's own label order: TorchServe's encoder sorts so.
    Declared,
}

impl StoredFamily {
    /// `labels` in the order [`observe`](Self::observe) / [`inc_by`](Self::inc_by) take values.
    pub fn new(
        name: &'static str,
        help: impl Into<String>,
        labels: &[&'static str],
        kind: Kind,
    ) -> Self {
        if let Kind::Histogram(bounds) = kind {
            debug_assert!(
                bounds.windows(2).all(|w| w[0] < w[1]),
                "{name}: bounds ascend"
            );
        }
        let mut sorted_index: Vec<usize> = (0..labels.len()).collect();
        sorted_index.sort_by_key(|&i| labels[i]);
        StoredFamily {
            inner: Arc::new(Inner {
                name,
                help: help.into(),
                kind,
                labels: labels.into(),
                sorted: sorted_index.iter().map(|&i| labels[i]).collect(),
                sorted_index: sorted_index.into(),
                series: Mutex::new(Series::default()),
            }),
        }
    }

    /// A counter family.
    pub fn counter(name: &'static str, help: impl Into<String>, labels: &[&'static str]) -> Self {
        Self::new(name, help, labels, Kind::Counter)
    }

    /// A histogram family with these bucket bounds.
    pub fn histogram(
        name: &'static str,
        help: impl Into<String>,
        labels: &[&'static str],
        bounds: &'static [f64],
    ) -> Self {
        Self::new(name, help, labels, Kind::Histogram(bounds))
    }

    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    pub fn help(&self) -> &str {
        &self.inner.help
    }

    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// Label names in the family's own order.
    pub fn labels(&self) -> &[&'static str] {
        &self.inner.labels
    }

    /// A histogram: records `v` in the series of `values` (in the family's label order).
    pub fn observe(&self, values: &[&str], v: f64) {
        if let Some(f) = self.observation(v) {
            self.update(values, f);
        }
    }

    /// [`StoredFamily::observe`] on a series found before.
    pub fn observe_id(&self, id: SeriesId, v: f64) {
        if let Some(f) = self.observation(v) {
            self.update_id(id, f);
        }
    }

    /// A counter: adds `v` (>= 0, as prometheus's counters demand) to the series of `values`.
    pub fn inc_by(&self, values: &[&str], v: f64) {
        if let Some(f) = self.addition(v) {
            self.update(values, f);
        }
    }

    /// [`StoredFamily::inc_by`] on a series found before.
    pub fn inc_by_id(&self, id: SeriesId, v: f64) {
        if let Some(f) = self.addition(v) {
            self.update_id(id, f);
        }
    }

    /// The series of `values`, made if new, for updates that skip the label lookup (an inference
    /// response updates several families with the same labels). `None`: wrong number of values.
    pub fn series_id(&self, values: &[&str]) -> Option<SeriesId> {
        let mut guard = self.lock_checked(values)?;
        let index = self.find_or_insert(&mut guard, values);
        Some(SeriesId {
            family: Arc::as_ptr(&self.inner) as usize,
            index,
        })
    }

    fn observation(&self, v: f64) -> Option<impl FnOnce(&mut Entry)> {
        let Kind::Histogram(bounds) = self.inner.kind else {
            self.misuse("observe on a counter");
            return None;
        };
        Some(move |e: &mut Entry| {
            // As prometheus::Histogram: the first bucket whose bound is >= v (none for NaN or
            // above the last bound: then only count and sum move).
            if let Some(i) = bounds.iter().position(|b| v <= *b) {
                e.buckets[i] += 1;
            }
            e.count += 1;
            e.sum += v;
        })
    }

    fn addition(&self, v: f64) -> Option<impl FnOnce(&mut Entry)> {
        if self.inner.kind != Kind::Counter {
            self.misuse("inc_by on a histogram");
            return None;
        }
        if v.is_nan() || v < 0.0 {
            self.misuse("counter decreased or NaN");
            return None;
        }
        Some(move |e: &mut Entry| e.sum += v)
    }

    fn misuse(&self, what: &str) {
        // Programming errors, not input: the value is dropped, never the agent.
        tracing::error!(
            family = self.inner.name,
            what,
            "metric misuse; value dropped"
        );
    }

    fn update(&self, values: &[&str], f: impl FnOnce(&mut Entry)) {
        let Some(mut guard) = self.lock_checked(values) else {
            return;
        };
        let index = self.find_or_insert(&mut guard, values);
        if let Some(entry) = guard.entries.get_mut(index) {
            f(entry);
        }
    }

    fn update_id(&self, id: SeriesId, f: impl FnOnce(&mut Entry)) {
        if id.family != Arc::as_ptr(&self.inner) as usize {
            self.misuse("series id of another family");
            return;
        }
        let mut guard = self
            .inner
            .series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Series are never removed, so an id stays valid.
        if let Some(entry) = guard.entries.get_mut(id.index) {
            f(entry);
        }
    }

    /// The series lock, if `values` has one value per label.
    fn lock_checked(&self, values: &[&str]) -> Option<std::sync::MutexGuard<'_, Series>> {
        let inner = &*self.inner;
        if values.len() != inner.labels.len() {
            self.misuse("wrong number of label values");
            return None;
        }
        Some(inner.series.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Index in `entries` of the series of `values`, made if new.
    fn find_or_insert(&self, series: &mut Series, values: &[&str]) -> usize {
        let Series {
            entries,
            by_key,
            key,
            ..
        } = series;
        label_key(key, values);
        if let Some(&i) = by_key.get(key.as_slice()) {
            return i;
        }
        entries.push(Entry {
            values: values.iter().map(|v| (*v).to_owned()).collect(),
            buckets: match self.inner.kind {
                Kind::Histogram(bounds) => vec![0; bounds.len()].into(),
                Kind::Counter => Box::default(),
            },
            count: 0,
            sum: 0.0,
        });
        by_key.insert(key.as_slice().into(), entries.len() - 1);
        entries.len() - 1
    }

    /// Calls `f` for every series in `order`. Holds the family's lock meanwhile (the reader thread
    /// waits to count): `f` only formats.
    pub fn for_each_series(&self, order: Order, mut f: impl FnMut(&SeriesView<'_>)) {
        let inner = &*self.inner;
        let mut guard = inner.series.lock().unwrap_or_else(PoisonError::into_inner);
        let Series {
            entries,
            gather_order,
            declared_order,
            ..
        } = &mut *guard;
        let sorted = match order {
            Order::Declared => declared_order,
            Order::Gather => gather_order,
        };
        if sorted.len() != entries.len() {
            sorted.clear();
            sorted.extend(0..entries.len());
            let values = |i: usize| &entries[i].values;
            match order {
                Order::Declared => sorted.sort_unstable_by(|&a, &b| values(a).cmp(values(b))),
                Order::Gather => sorted.sort_unstable_by(|&a, &b| {
                    let (a, b) = (values(a), values(b));
                    inner
                        .sorted_index
                        .iter()
                        .map(|&i| &a[i])
                        .cmp(inner.sorted_index.iter().map(|&i| &b[i]))
                }),
            }
        }
        for &i in sorted.iter() {
            if let Some(entry) = entries.get(i) {
                f(&SeriesView {
                    family: inner,
                    entry,
                });
            }
        }
    }

    /// Series so far.
    pub fn len(&self) -> usize {
        self.inner
            .series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The family as `prometheus::Registry::gather` would give it (`None` without series, as
    /// gather leaves such a family out).
    pub fn proto(&self) -> Option<MetricFamily> {
        let mut metrics = Vec::new();
        self.for_each_series(Order::Gather, |s| {
            let labels = s
                .sorted_labels()
                .map(|(name, value)| {
                    let mut p = LabelPair::default();
                    p.set_name(name.to_owned());
                    p.set_value(value.to_owned());
                    p
                })
                .collect();
            let mut m = Metric::from_label(labels);
            match self.inner.kind {
                Kind::Counter => {
                    let mut c = Counter::default();
                    c.set_value(s.value());
                    m.set_counter(c);
                }
                Kind::Histogram(bounds) => {
                    let buckets = s
                        .cumulative()
                        .zip(bounds)
                        .map(|(n, bound)| {
                            let mut b = Bucket::default();
                            b.set_cumulative_count(n);
                            b.set_upper_bound(*bound);
                            b
                        })
                        .collect();
                    let mut h = Histogram::default();
                    h.set_sample_count(s.count());
                    h.set_sample_sum(s.value());
                    h.set_bucket(buckets);
                    m.set_histogram(h);
                }
            }
            metrics.push(m);
        });
        if metrics.is_empty() {
            return None;
        }
        let mut mf = MetricFamily::default();
        mf.set_name(self.inner.name.to_owned());
        mf.set_help(self.inner.help.clone());
        mf.set_field_type(match self.inner.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Histogram(_) => MetricType::HISTOGRAM,
        });
        mf.set_metric(metrics);
        Some(mf)
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{CounterVec, HistogramOpts, HistogramVec, Opts};
    use proptest::prelude::*;

    use super::*;

    const BOUNDS: [f64; 4] = [0.5, 1.0, 2.5, 10.0];
    const LABELS: [&str; 3] = ["model_name", "model_version", "hostname"];

    type Observations<'a> = [([&'a str; 3], f64)];

    /// The same observations through prometheus's own vecs and through a stored family give the
    /// same gathered families.
    fn same_as_prometheus(observations: &Observations<'_>) {
        let registry = prometheus::Registry::new();
        let hist = HistogramVec::new(
            HistogramOpts::new("h_seconds", "Help.").buckets(BOUNDS.to_vec()),
            &LABELS,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let counter = CounterVec::new(Opts::new("c_total", "Help \\ c."), &LABELS)
            .unwrap_or_else(|e| panic!("{e}"));
        for c in [
            Box::new(hist.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(counter.clone()),
        ] {
            registry.register(c).unwrap_or_else(|e| panic!("{e}"));
        }
        let ours_h = StoredFamily::histogram("h_seconds", "Help.", &LABELS, &BOUNDS);
        let ours_c = StoredFamily::counter("c_total", "Help \\ c.", &LABELS);
        for (values, v) in observations {
            ours_h.observe(values, *v);
            hist.with_label_values(values).observe(*v);
            if *v >= 0.0 {
                ours_c.inc_by(values, *v);
                counter.with_label_values(values).inc_by(*v);
            }
        }
        let want = registry.gather();
        let got: Vec<MetricFamily> = [ours_c.proto(), ours_h.proto()]
            .into_iter()
            .flatten()
            .collect();
        assert_same(&got, &want);
    }

    pub(crate) fn assert_same(got: &[MetricFamily], want: &[MetricFamily]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.name(), w.name());
            assert_eq!(g.help(), w.help());
            assert_eq!(g.get_field_type(), w.get_field_type());
            assert_eq!(g.get_metric().len(), w.get_metric().len(), "{}", g.name());
            for (gm, wm) in g.get_metric().iter().zip(w.get_metric()) {
                let pairs = |m: &Metric| {
                    m.get_label()
                        .iter()
                        .map(|p| (p.name().to_owned(), p.value().to_owned()))
                        .collect::<Vec<_>>()
                };
                assert_eq!(pairs(gm), pairs(wm));
                // prometheus sums in two shards: the same values, possibly another rounding.
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 || (a.is_nan() && b.is_nan());
                assert!(close(
                    gm.get_counter().get_value(),
                    wm.get_counter().get_value()
                ));
                let (gh, wh) = (gm.get_histogram(), wm.get_histogram());
                assert_eq!(gh.get_sample_count(), wh.get_sample_count());
                assert!(close(gh.get_sample_sum(), wh.get_sample_sum()));
                let buckets = |h: &Histogram| {
                    h.get_bucket()
                        .iter()
                        .map(|b| (b.cumulative_count(), b.upper_bound().to_bits()))
                        .collect::<Vec<_>>()
                };
                assert_eq!(buckets(gh), buckets(wh));
            }
        }
    }

    #[test]
    fn counts_buckets_and_order_as_prometheus() {
        same_as_prometheus(&[
            (["b", "1.0", "h"], 0.5),
            (["a", "1.0", "h"], 0.7),
            (["a", "1.0", "h"], 10.0),
            (["a", "1.0", "h"], 11.0),
            (["a", "default", "g"], f64::NAN),
            (["a", "default", "g"], 0.0),
            (["b", "1.0", "a"], -1.0),
        ]);
    }

    #[test]
    fn declared_order_sorts_by_the_familys_own_label_order() {
        let c = StoredFamily::counter("c_total", "Help.", &LABELS);
        c.inc_by(&["b", "1.0", "a"], 1.0);
        c.inc_by(&["a", "2.0", "z"], 1.0);
        let mut declared = Vec::new();
        c.for_each_series(Order::Declared, |s| declared.push(s.values()[0].clone()));
        // Gather order puts hostname first: "a" < "z".
        let mut gathered = Vec::new();
        c.for_each_series(Order::Gather, |s| gathered.push(s.values()[0].clone()));
        assert_eq!(declared, ["a", "b"]);
        assert_eq!(gathered, ["b", "a"]);
    }

    #[test]
    fn series_added_after_a_scrape_take_their_place() {
        let c = StoredFamily::counter("c_total", "Help.", &LABELS);
        let listed = |c: &StoredFamily, order| {
            let mut v = Vec::new();
            c.for_each_series(order, |s| v.push((s.values()[0].clone(), s.value())));
            v
        };
        c.inc_by(&["m", "1.0", "h"], 1.0);
        c.inc_by(&["b", "1.0", "h"], 2.0);
        for order in [Order::Gather, Order::Declared] {
            assert_eq!(listed(&c, order), [("b".into(), 2.0), ("m".into(), 1.0)]);
        }
        c.inc_by(&["a", "1.0", "h"], 3.0);
        c.inc_by(&["m", "1.0", "h"], 1.0);
        for order in [Order::Gather, Order::Declared] {
            assert_eq!(
                listed(&c, order),
                [("a".into(), 3.0), ("b".into(), 2.0), ("m".into(), 2.0)]
            );
        }
    }

    #[test]
    fn series_ids_update_the_series_they_name() {
        let c = StoredFamily::counter("c_total", "Help.", &LABELS);
        let h = StoredFamily::histogram("h_seconds", "Help.", &LABELS, &BOUNDS);
        let id = c.series_id(&["m", "1.0", "h"]).expect("three values");
        assert!(c.series_id(&["m", "1.0"]).is_none(), "wrong label count");
        c.inc_by_id(id, 2.0);
        c.inc_by(&["m", "1.0", "h"], 1.0);
        c.inc_by_id(id, 0.5);
        let values = |c: &StoredFamily| {
            let mut v = Vec::new();
            c.for_each_series(Order::Gather, |s| v.push((s.values().to_vec(), s.value())));
            v
        };
        assert_eq!(
            values(&c),
            [(vec!["m".into(), "1.0".into(), "h".into()], 3.5)]
        );
        // Another family's id and a counter's misuse are dropped, not applied.
        let hid = h.series_id(&["m", "1.0", "h"]).expect("three values");
        c.inc_by_id(hid, 100.0);
        c.inc_by_id(id, -1.0);
        assert_eq!(values(&c)[0].1, 3.5);
        h.observe_id(hid, 0.7);
        h.observe(&["m", "1.0", "h"], 20.0);
        let mut seen = Vec::new();
        h.for_each_series(Order::Gather, |s| {
            seen.push((s.count(), s.value(), s.cumulative().collect::<Vec<_>>()))
        });
        assert_eq!(seen, [(2, 20.7, vec![0, 1, 1, 1])]);
    }

    #[test]
    fn no_series_no_family() {
        let h = StoredFamily::histogram("h_seconds", "Help.", &LABELS, &BOUNDS);
        assert!(h.proto().is_none());
        assert!(h.is_empty());
    }

    #[test]
    fn keys_are_injective() {
        // Joined naively, ("ab", "c") and ("a", "bc") would be one series.
        let h = StoredFamily::counter("c_total", "Help.", &LABELS);
        h.inc_by(&["ab", "c", "h"], 1.0);
        h.inc_by(&["a", "bc", "h"], 1.0);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn misuse_drops_the_value() {
        let h = StoredFamily::histogram("h_seconds", "Help.", &LABELS, &BOUNDS);
        h.observe(&["a", "b"], 1.0);
        h.inc_by(&["a", "b", "c"], 1.0);
        assert!(h.is_empty());
        let c = StoredFamily::counter("c_total", "Help.", &LABELS);
        c.inc_by(&["a", "b", "c"], -1.0);
        c.inc_by(&["a", "b", "c"], f64::NAN);
        c.observe(&["a", "b", "c"], 1.0);
        assert!(c.is_empty());
    }

    proptest! {
        #[test]
        fn any_observations_as_prometheus(
            obs in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["m", "n", "a\"b", "x\\y", "é", ""]),
                    proptest::sample::select(vec!["1.0", "default"]),
                    proptest::sample::select(vec!["vm", "pod-1"]),
                    prop_oneof![-1.0..20.0f64, Just(0.5), Just(1.0), Just(10.0)],
                ),
                0..60,
            )
        ) {
            let obs: Vec<([&str; 3], f64)> =
                obs.into_iter().map(|(a, b, c, v)| ([a, b, c], v)).collect();
            same_as_prometheus(&obs);
        }
    }
}
