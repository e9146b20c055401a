//! Points in time as operators write them: `2026-11-22T19:36:00Z` (RFC
//! 3339, any offset), `-90s` / `-5m` / `-2h` / `-1d` (ago), `lsn:N`,
//! `bookmark:NAME`, and in a read-only branch (volume/branch.rs)
//! `branch:NAME` (its end) or `branch:NAME@T` with T any other form.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A moment of a volume's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointInTime {
    /// Nanoseconds since the Unix epoch.
    Time(u64),
    /// This long before now.
    Ago(Duration),
    /// The disk after record `N` (and every record before it).
    Lsn(u64),
    /// The moment a bookmark was taken.
    Bookmark(String),
    /// A moment of a branch's history: `at` read inside the branch (its
    /// lsns, times and bookmarks), or its end when `None`. Never another
    /// branch point.
    Branch {
        name: String,
        at: Option<Box<PointInTime>>,
    },
}

impl PointInTime {
    /// The moment bookmark `name` was taken, the name checked exactly as
    /// the volume checks it when taking one (no trimming).
    pub fn bookmark(name: &str) -> Result<PointInTime, String> {
        crate::format::check_bookmark_name(name)?;
        Ok(PointInTime::Bookmark(name.to_owned()))
    }

    /// The moment as ns since the epoch, given the time now (`None` for lsns
    /// and bookmarks, and for moments before 1970).
    pub fn timestamp(&self, now_ns: u64) -> Option<u64> {
        match self {
            PointInTime::Time(ns) => Some(*ns),
            PointInTime::Ago(d) => {
                now_ns.checked_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            }
            PointInTime::Lsn(_) | PointInTime::Bookmark(_) | PointInTime::Branch { .. } => None,
        }
    }
}

/// Checks a branch name: the rules of bookmark names (it is typed as
/// `branch:NAME`, and `@` never occurs in it).
pub fn check_branch_name(name: &str) -> Result<(), String> {
    crate::format::check_bookmark_name(name).map_err(|_| {
        format!(
            "branch name {name:?} must be 1 to {} letters, digits, '.', '_', '-' or ':'",
            crate::format::MAX_BOOKMARK_NAME
        )
    })
}

/// Longest point spec read: far beyond any real one, and small enough that
/// errors may quote it whole.
const MAX_POINT_LEN: usize = 1024;

const EXPECTED: &str = "expected an RFC 3339 time (2026-11-22T19:36:00Z), a time ago \
                        (-90s, -5m, -2h), lsn:N, bookmark:NAME, branch:NAME or branch:NAME@T";

impl FromStr for PointInTime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() > MAX_POINT_LEN {
            let start: String = s.chars().take(40).collect();
            return Err(format!(
                "a point in time is at most {MAX_POINT_LEN} bytes; this one is {} bytes \
                 (starting {start:?}); {EXPECTED}",
                s.len()
            ));
        }
        let bad = |why: String| format!("cannot read {s:?} as a point in time: {why}; {EXPECTED}");
        if let Some(n) = s.strip_prefix("lsn:") {
            return n
                .parse()
                .map(PointInTime::Lsn)
                .map_err(|e| bad(format!("{e}")));
        }
        if let Some(rest) = s.strip_prefix("branch:") {
            let (name, at) = match rest.split_once('@') {
                Some((name, at)) => (name, Some(at)),
                None => (rest, None),
            };
            check_branch_name(name).map_err(bad)?;
            let at = match at {
                None => None,
                // Refused before parsing: one level of nesting at most.
                Some(at) if at.trim_start().starts_with("branch:") => {
                    return Err(bad("a branch point names no other branch".into()))
                }
                Some(at) => match at.parse::<PointInTime>() {
                    Ok(point) => Some(Box::new(point)),
                    // The inner error already names the forms.
                    Err(e) => return Err(format!("in {s:?}: {e}")),
                },
            };
            return Ok(PointInTime::Branch {
                name: name.to_owned(),
                at,
            });
        }
        if let Some(name) = s.strip_prefix("bookmark:") {
            crate::format::check_bookmark_name(name).map_err(bad)?;
            return Ok(PointInTime::Bookmark(name.to_owned()));
        }
        if let Some(ago) = s.strip_prefix('-') {
            return humantime::parse_duration(ago)
                .map(PointInTime::Ago)
                .map_err(|e| bad(e.to_string()));
        }
        let t: jiff::Timestamp = s.parse().map_err(|e: jiff::Error| bad(e.to_string()))?;
        u64::try_from(t.as_nanosecond())
            .map(PointInTime::Time)
            .map_err(|_| bad("it is before 1970".into()))
    }
}

impl fmt::Display for PointInTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointInTime::Time(ns) => f.write_str(&format_ns(*ns)),
            PointInTime::Ago(d) => write!(f, "-{}", humantime::format_duration(*d)),
            PointInTime::Lsn(n) => write!(f, "lsn:{n}"),
            PointInTime::Bookmark(name) => write!(f, "bookmark:{name}"),
            PointInTime::Branch { name, at: None } => write!(f, "branch:{name}"),
            PointInTime::Branch { name, at: Some(at) } => write!(f, "branch:{name}@{at}"),
        }
    }
}

/// RFC 3339 in UTC, with as many fractional digits as the time needs.
pub fn format_ns(ns: u64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .map_or_else(|_| format!("{ns}ns"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        let cases = [
            (
                "2026-11-22T19:36:00Z",
                PointInTime::Time(1_795_376_160_000_000_000),
            ),
            (
                "2026-11-22T20:36:00+01:00",
                PointInTime::Time(1_795_376_160_000_000_000),
            ),
            ("-90s", PointInTime::Ago(Duration::from_secs(90))),
            ("-5m", PointInTime::Ago(Duration::from_secs(300))),
            ("-2h", PointInTime::Ago(Duration::from_secs(7200))),
            ("lsn:42", PointInTime::Lsn(42)),
            (
                "bookmark:before-upgrade",
                PointInTime::Bookmark("before-upgrade".into()),
            ),
            (
                "branch:e3-1201",
                PointInTime::Branch {
                    name: "e3-1201".into(),
                    at: None,
                },
            ),
            (
                "branch:e3-1201@lsn:1300",
                PointInTime::Branch {
                    name: "e3-1201".into(),
                    at: Some(Box::new(PointInTime::Lsn(1300))),
                },
            ),
            (
                "branch:old@2026-11-22T19:36:00Z",
                PointInTime::Branch {
                    name: "old".into(),
                    at: Some(Box::new(PointInTime::Time(1_795_376_160_000_000_000))),
                },
            ),
            (
                "branch:old@-90s",
                PointInTime::Branch {
                    name: "old".into(),
                    at: Some(Box::new(PointInTime::Ago(Duration::from_secs(90)))),
                },
            ),
            (
                "branch:a:b@bookmark:c:d",
                PointInTime::Branch {
                    name: "a:b".into(),
                    at: Some(Box::new(PointInTime::Bookmark("c:d".into()))),
                },
            ),
        ];
        for (text, want) in cases {
            let got: PointInTime = text.parse().expect(text);
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<PointInTime>().expect("again"), want);
        }
        assert_eq!(
            format_ns(1_795_376_160_500_000_000),
            "2026-11-22T19:36:00.5Z"
        );
    }

    #[test]
    fn nonsense_is_refused_with_the_forms_it_takes() {
        for text in [
            "",
            "yesterday",
            "lsn:x",
            "-5 parsecs",
            "bookmark:",
            "bookmark:a b",
            "1969-01-01T00:00:00Z",
            "branch:",
            "branch:a b",
            "branch:x@",
            "branch:x@yesterday",
            "branch:x@branch:y",
            "branch:@lsn:3",
        ] {
            let err = text.parse::<PointInTime>().expect_err(text);
            assert!(
                err.contains("RFC 3339") && err.contains("branch:NAME@T"),
                "{err}"
            );
        }
        assert_eq!(
            PointInTime::Ago(Duration::from_secs(10)).timestamp(5_000_000_000),
            None
        );
    }

    #[test]
    fn nested_branches_and_long_specs_are_refused_shortly() {
        // Deeply nested: refused at the first level, without recursing.
        let nested = format!("{}lsn:1", "branch:a@".repeat(6000));
        let err = nested.parse::<PointInTime>().expect_err("nested");
        assert!(err.contains("at most 1024 bytes"), "{err}");
        assert!(err.len() < 1000, "{} bytes of error", err.len());
        let nested = format!("{}lsn:1", "branch:a@".repeat(100));
        let err = nested.parse::<PointInTime>().expect_err("nested");
        assert!(err.contains("names no other branch"), "{err}");
        assert!(err.len() < 2 * nested.len(), "{} bytes of error", err.len());
        let long = format!("bookmark:{}", "x".repeat(MAX_POINT_LEN));
        let err = long.parse::<PointInTime>().expect_err("long");
        assert!(
            err.contains("at most 1024 bytes") && err.contains("branch:NAME@T"),
            "{err}"
        );
        let inner_err = "branch:a@yesterday"
            .parse::<PointInTime>()
            .expect_err("inner");
        assert!(inner_err.contains("\"yesterday\""), "{inner_err}");
    }

    #[test]
    fn a_bookmark_name_is_checked_exactly() {
        assert_eq!(
            PointInTime::bookmark("x"),
            Ok(PointInTime::Bookmark("x".into()))
        );
        for name in ["x ", " x", "", "a@b"] {
            let err = PointInTime::bookmark(name).expect_err(name);
            assert!(err.contains("bookmark name"), "{err}");
        }
    }
}
