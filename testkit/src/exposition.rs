//! Reading the Prometheus text exposition format (version 0.0.4) strictly: every sample
//! must belong to a family declared by a `# TYPE` line before it, names and labels must be
//! well-formed, values must be numbers, histogram buckets must carry `le`.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: the declared families (name → type) and the samples.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The type of family `name` (`counter`, `gauge`, `histogram`, ...), if declared.
    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.types.get(name).map(String::as_str)
    }

    /// The sum of the samples named `name` whose labels include every pair of `labels`
    /// (0 when there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether a sample named `name` with these labels exists.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

const TYPES: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    valid_name(s) && !s.contains(':')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The family a sample name belongs to.
fn family<'a>(types: &BTreeMap<String, String>, name: &'a str) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return Some(base);
            }
        }
    }
    None
}

fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = rest[..eq].trim();
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = &rest[end + 1..];
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ','".into());
        }
    }
}

/// Parses `text`, naming the first offending line on error.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().ok_or_else(|| at("TYPE without name".into()))?;
                    let kind = words.next().ok_or_else(|| at("TYPE without type".into()))?;
                    if !valid_name(name) || !TYPES.contains(&kind) || words.next().is_some() {
                        return Err(at("malformed TYPE".into()));
                    }
                    if out.types.insert(name.into(), kind.into()).is_some() {
                        return Err(at(format!("{name} declared twice")));
                    }
                }
                Some("HELP") => {
                    let name = words.next().ok_or_else(|| at("HELP without name".into()))?;
                    if !valid_name(name) {
                        return Err(at("malformed HELP".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => parse_labels(after).map_err(at)?,
            None => (Default::default(), &line[name_end..]),
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| at("bad value".into()))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing text".into()));
        }
        let family = family(&out.types, name)
            .ok_or_else(|| at(format!("{name} has no # TYPE line before it")))?;
        if name.ends_with("_bucket")
            && out.type_of(family) == Some("histogram")
            && !labels.contains_key("le")
        {
            return Err(at("histogram bucket without le".into()));
        }
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_well_formed_text_and_refuses_the_rest() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n\
                    a_total{x=\"1\",y=\"q\\\"uo\\\\te\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                    h_sum 0.7\nh_count 2\n";
        let e = parse(text).expect("valid");
        assert_eq!(e.type_of("a_total"), Some("counter"));
        assert_eq!(e.sum("a_total", &[("x", "1")]), 3.0);
        assert_eq!(e.samples[0].labels["y"], "q\"uo\\te");
        assert_eq!(e.sum("h_count", &[]), 2.0);
        for bad in [
            "a_total 1\n",
            "# TYPE a counter\na{x=1} 1\n",
            "# TYPE a counter\na{x=\"1\"} one\n",
            "# TYPE a wrong\n",
            "# TYPE h histogram\nh_bucket 1\n",
            "# TYPE 1a counter\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
