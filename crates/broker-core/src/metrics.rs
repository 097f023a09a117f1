//! The histograms the drainers keep in Redis (counters of the `stats` hash, added to by the
//! finish script), so that every API process serves the same figures for all drainers:
//! for a histogram `<name>` and label `<label>`, `h:<name>:<label>:<i>` counts the values in
//! bucket `i` (not cumulative; `i` = the number of bounds for the values above every bound),
//! `h:<name>:<label>:sum` adds them up and `h:<name>:<label>:count` counts them.

/// Bounds of the time histograms, in milliseconds.
pub const MS_BOUNDS: &[u64] = &[
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
];

/// Bounds of the attempts histogram.
pub const ATTEMPT_BOUNDS: &[u64] = &[1, 2, 3, 5, 10];

/// The histograms, with their bounds and what they measure.
pub const HISTOGRAMS: &[(&str, &[u64], &str)] = &[
    (
        "queue_wait",
        MS_BOUNDS,
        "time from acceptance to the start of the turn, ms",
    ),
    ("turn", MS_BOUNDS, "time the turn took at the worker, ms"),
    (
        "end_to_end",
        MS_BOUNDS,
        "time from acceptance to the stored outcome, ms",
    ),
    (
        "callback",
        MS_BOUNDS,
        "time a callback took to be delivered or given up, ms",
    ),
    (
        "callback_attempts",
        ATTEMPT_BOUNDS,
        "attempts a callback took",
    ),
];

/// The stats fields (as the finish script's `+<counter>` fields) that record `value` in
/// histogram `name` under `label`.
pub fn observe(out: &mut Vec<(String, String)>, name: &str, label: &str, value: u64) {
    let bounds = HISTOGRAMS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or(MS_BOUNDS, |(_, b, _)| *b);
    let bucket = bounds
        .iter()
        .position(|b| value <= *b)
        .unwrap_or(bounds.len());
    out.push((format!("+h:{name}:{label}:{bucket}"), "1".into()));
    out.push((format!("+h:{name}:{label}:sum"), value.to_string()));
    out.push((format!("+h:{name}:{label}:count"), "1".into()));
}

/// One histogram read back from the stats hash.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(upper bound, cumulative count)`, `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// The histograms of the stats hash: `(name, label) -> histogram`, for every label seen.
pub fn read_histograms(
    stats: &std::collections::HashMap<String, i64>,
) -> Vec<(&'static str, String, Histogram)> {
    let mut labels: Vec<(&'static str, String)> = Vec::new();
    for field in stats.keys() {
        let Some(rest) = field.strip_prefix("h:") else {
            continue;
        };
        let mut parts = rest.splitn(3, ':');
        let (Some(name), Some(label), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let Some((known, _, _)) = HISTOGRAMS.iter().find(|(n, _, _)| *n == name) {
            if !labels.iter().any(|(n, l)| n == known && l == label) {
                labels.push((known, label.to_owned()));
            }
        }
    }
    labels.sort();
    labels
        .into_iter()
        .map(|(name, label)| {
            let bounds = HISTOGRAMS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or(MS_BOUNDS, |(_, b, _)| *b);
            let get = |part: &str| {
                stats
                    .get(&format!("h:{name}:{label}:{part}"))
                    .copied()
                    .unwrap_or(0)
                    .max(0) as u64
            };
            let mut cumulative = 0;
            let mut buckets = Vec::with_capacity(bounds.len() + 1);
            for (i, bound) in bounds.iter().enumerate() {
                cumulative += get(&i.to_string());
                buckets.push((*bound as f64, cumulative));
            }
            cumulative += get(&bounds.len().to_string());
            buckets.push((f64::INFINITY, cumulative));
            let histogram = Histogram {
                buckets,
                sum: get("sum") as f64,
                count: get("count"),
            };
            (name, label, histogram)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_values_read_back_as_cumulative_buckets() {
        let mut fields = Vec::new();
        observe(&mut fields, "turn", "sync", 7);
        observe(&mut fields, "turn", "sync", 400_000);
        observe(&mut fields, "callback_attempts", "callback", 2);
        let mut stats = std::collections::HashMap::new();
        for (name, value) in fields {
            *stats.entry(name[1..].to_owned()).or_insert(0) += value.parse::<i64>().unwrap();
        }
        let read = read_histograms(&stats);
        let turn = &read.iter().find(|(n, _, _)| *n == "turn").unwrap().2;
        assert_eq!(turn.count, 2);
        assert_eq!(turn.sum, 400_007.0);
        assert_eq!(turn.buckets[0], (5.0, 0));
        assert_eq!(turn.buckets[1], (10.0, 1));
        assert_eq!(*turn.buckets.last().unwrap(), (f64::INFINITY, 2));
        let attempts = &read
            .iter()
            .find(|(n, _, _)| *n == "callback_attempts")
            .unwrap();
        assert_eq!(attempts.1, "callback");
        assert_eq!(attempts.2.buckets[1], (2.0, 1));
    }
}
