//! A strict parser of the Prometheus text exposition format (version 0.0.4), for tests.
//!
//! Stricter than a scraper on purpose: what Switchyard serves must be unambiguous, so this
//! refuses anything a lenient parser would skip or guess at. Refused: a sample before its
//! family's `# TYPE`; a `# HELP` or `# TYPE` given twice, or after the family's samples; a
//! family split in two; comments other than `# HELP`/`# TYPE`; invalid metric or label
//! names; label names starting with `__`; a label named twice; unknown escapes; values
//! that are not Go floats (`+Inf`, `-Inf`, `NaN` spelled so); a sample whose name does not
//! belong to its family (`_bucket`/`_sum`/`_count` for histograms); the same series twice;
//! a negative or NaN counter; histograms whose buckets are not cumulative or whose `+Inf`
//! bucket differs from `_count`; text that does not end in a newline.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

/// A family's `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_bucket`, `x_sum`, ... for histograms).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A metric family: its HELP, TYPE and samples, in order.
#[derive(Debug, Clone)]
pub struct Family {
    pub help: Option<String>,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Family {
    /// The label names of the family's series, without the `le`/`quantile` of buckets and
    /// quantiles; one set per distinct combination seen.
    pub fn label_sets(&self) -> BTreeSet<BTreeSet<String>> {
        self.samples
            .iter()
            .map(|s| {
                s.labels
                    .keys()
                    .filter(|k| !(k.as_str() == "le" && s.name.ends_with("_bucket")))
                    .filter(|k| !(k.as_str() == "quantile" && self.kind == Kind::Summary))
                    .cloned()
                    .collect()
            })
            .collect()
    }
}

impl Exposition {
    /// The family `name`; panics naming it when absent.
    pub fn family(&self, name: &str) -> &Family {
        self.families
            .get(name)
            .unwrap_or_else(|| panic!("no metric family {name}"))
    }

    /// The value of the sample `name` with exactly `labels`; panics when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// The value of the sample `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Every sample of every family.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.values().flat_map(|f| f.samples.iter())
    }
}

/// Parses `text`, or says which line is wrong and why.
pub fn parse(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut out = Exposition::default();
    // The family being read, and whether it has samples yet.
    let mut current: Option<(String, bool)> = None;
    let mut series: BTreeSet<(String, BTreeMap<String, String>)> = BTreeSet::new();
    let mut pending_help: Option<(String, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment
                .strip_prefix(' ')
                .ok_or_else(|| at("a comment must be `# HELP` or `# TYPE`".into()))?;
            let (keyword, rest) = comment
                .split_once(' ')
                .ok_or_else(|| at("a comment must be `# HELP` or `# TYPE`".into()))?;
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name).map_err(at)?;
            let opens_new = current.as_ref().is_none_or(|(c, _)| c != name);
            if opens_new {
                if out.families.contains_key(name)
                    || pending_help.as_ref().is_some_and(|(n, _)| n != name)
                {
                    return Err(at(format!("family {name} appears twice or out of order")));
                }
            } else if current.as_ref().is_some_and(|(_, sampled)| *sampled) {
                return Err(at(format!("{keyword} after the samples of {name}")));
            }
            match keyword {
                "HELP" => {
                    let help = unescape(arg, false).map_err(at)?;
                    let known = out.families.get(name).and_then(|f| f.help.as_ref());
                    if known.is_some() || pending_help.is_some() {
                        return Err(at(format!("second HELP for {name}")));
                    }
                    match out.families.get_mut(name) {
                        Some(f) => f.help = Some(help),
                        None => pending_help = Some((name.to_owned(), help)),
                    }
                }
                "TYPE" => {
                    if !opens_new {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                    let kind = match arg {
                        "counter" => Kind::Counter,
                        "gauge" => Kind::Gauge,
                        "histogram" => Kind::Histogram,
                        "summary" => Kind::Summary,
                        "untyped" => Kind::Untyped,
                        other => return Err(at(format!("unknown type {other:?}"))),
                    };
                    let help = pending_help.take().map(|(_, h)| h);
                    out.families.insert(
                        name.to_owned(),
                        Family {
                            help,
                            kind,
                            samples: Vec::new(),
                        },
                    );
                    current = Some((name.to_owned(), false));
                }
                other => return Err(at(format!("unknown comment keyword {other:?}"))),
            }
            continue;
        }
        if pending_help.is_some() {
            return Err(at("a HELP without a TYPE before the samples".into()));
        }
        let sample = parse_sample(line).map_err(at)?;
        let Some((family_name, sampled)) = current.as_mut() else {
            return Err(at("a sample before any TYPE".into()));
        };
        let family = out
            .families
            .get_mut(family_name.as_str())
            .expect("the current family was inserted at its TYPE");
        if !belongs(&sample, family_name, family.kind) {
            return Err(at(format!(
                "sample {} does not belong to the {:?} family {family_name}",
                sample.name, family.kind
            )));
        }
        if family.kind == Kind::Counter && (sample.value.is_nan() || sample.value < 0.0) {
            return Err(at("a counter that is negative or NaN".into()));
        }
        if !series.insert((sample.name.clone(), sample.labels.clone())) {
            return Err(at("the same series twice".into()));
        }
        *sampled = true;
        family.samples.push(sample);
    }
    if let Some((name, _)) = pending_help {
        return Err(format!("HELP for {name} without a TYPE"));
    }
    for (name, family) in &out.families {
        if family.kind == Kind::Histogram {
            check_histogram(name, family)?;
        }
    }
    Ok(out)
}

fn belongs(sample: &Sample, family: &str, kind: Kind) -> bool {
    let suffix = sample.name.strip_prefix(family);
    match kind {
        Kind::Counter | Kind::Gauge | Kind::Untyped => suffix == Some(""),
        Kind::Histogram => match suffix {
            Some("_bucket") => sample.labels.contains_key("le"),
            Some("_sum" | "_count") => !sample.labels.contains_key("le"),
            _ => false,
        },
        Kind::Summary => match suffix {
            Some("") => sample.labels.contains_key("quantile"),
            Some("_sum" | "_count") => !sample.labels.contains_key("quantile"),
            _ => false,
        },
    }
}

/// Buckets cumulative in `le` order, a `+Inf` bucket equal to `_count`, and a `_sum`.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    for s in family
        .samples
        .iter()
        .filter(|s| s.name.ends_with("_bucket"))
    {
        let mut key = s.labels.clone();
        let le = key
            .remove("le")
            .expect("buckets have le (checked by belongs)");
        let bound = parse_value(&le).map_err(|e| format!("{name}: le {le:?}: {e}"))?;
        groups.entry(key).or_default().push((bound, s.value));
    }
    for (labels, mut buckets) in groups {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets
            .windows(2)
            .any(|w| w[0].0 == w[1].0 || w[1].1 < w[0].1)
        {
            return Err(format!(
                "{name}{labels:?}: buckets repeat a bound or are not cumulative"
            ));
        }
        let inf = buckets
            .last()
            .filter(|b| b.0 == f64::INFINITY)
            .ok_or_else(|| format!("{name}{labels:?}: no +Inf bucket"))?
            .1;
        let with = |suffix: &str| {
            family
                .samples
                .iter()
                .find(|s| s.name == format!("{name}{suffix}") && s.labels == labels)
                .map(|s| s.value)
        };
        let count = with("_count").ok_or_else(|| format!("{name}{labels:?}: no _count"))?;
        with("_sum").ok_or_else(|| format!("{name}{labels:?}: no _sum"))?;
        if count != inf {
            return Err(format!(
                "{name}{labels:?}: _count {count} differs from the +Inf bucket {inf}"
            ));
        }
    }
    Ok(())
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().unwrap_or(""))?;
    if let Some(ts) = fields.next()
        && ts.parse::<i64>().is_err()
    {
        return Err(format!("timestamp {ts:?} is not an integer"));
    }
    if fields.next().is_some() {
        return Err("extra fields after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `name="value",...}`; returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or("a label without `=`")?;
        let name = &rest[..eq];
        check_label_name(name)?;
        let after = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value must be quoted")?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or("an unterminated label value")?;
        let value = unescape(&after[..end], true)?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = &after[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by `,`".into());
        }
    }
}

/// Go float syntax as Prometheus writes it.
fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    let numeric = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    match text.parse::<f64>() {
        Ok(v) if numeric => Ok(v),
        _ => Err(format!("value {text:?} is not a number")),
    }
}

fn unescape(text: &str, quotes: bool) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quotes => out.push('"'),
            other => return Err(format!("unknown escape \\{other:?}")),
        }
    }
    Ok(out)
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__");
    if ok {
        Ok(())
    } else {
        Err(format!("invalid or reserved label name {name:?}"))
    }
}
