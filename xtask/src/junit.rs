//! The e2e suite's JUnit report (ginkgo's `--junit-report`): what ran and how it ended, and
//! the same report trimmed for keeping: only specs (`[It]`; ginkgo also reports its suite
//! setup nodes), none the focus filtered out (ginkgo lists every spec of the suite, 3,000
//! of them, as skipped), and no captured output of passed specs.

use anyhow::{Context, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, Writer};

/// How one spec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Passed,
    /// Failed (ginkgo's failure, panic, timeout or interrupt), with the failure message.
    Failed(String),
    /// Skipped while running (the spec called Skip), with the reason.
    Skipped(String),
    /// Not selected by focus and skip: never ran.
    FilteredOut,
}

/// One spec of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The spec's full name (`[It] [sig-network] Services should ...`).
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Seconds it took.
    pub seconds: f64,
}

/// What a run's report says.
#[derive(Debug, Default)]
pub struct Summary {
    /// Every spec in the report, in its order.
    pub cases: Vec<Case>,
}

impl Summary {
    /// Specs that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }
    /// Specs that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
    /// Specs selected but skipped while running.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped(_)))
    }
    /// Specs that were selected (ran, or skipped themselves).
    pub fn selected(&self) -> usize {
        self.cases.len() - self.count(|o| matches!(o, Outcome::FilteredOut))
    }
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.cases.iter().filter(|c| f(&c.outcome)).count()
    }
    /// `N passed, N failed, N skipped`.
    pub fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }
}

fn attr(e: &BytesStart, name: &[u8]) -> Result<Option<String>> {
    for a in e.attributes() {
        let a = a?;
        if a.key.as_ref() == name {
            return Ok(Some(a.unescape_value()?.into_owned()));
        }
    }
    Ok(None)
}

/// Reads a ginkgo JUnit report. Ginkgo marks a spec the focus left out with a `skipped`
/// element whose message is exactly `skipped`; a spec that called Skip has
/// `skipped - <reason>`; failures are `failure` or `error` elements.
pub fn parse(xml: &str) -> Result<Summary> {
    let mut r = Reader::from_str(xml);
    let mut out = Summary::default();
    let mut current: Option<Case> = None;
    loop {
        let ev = r.read_event().context("reading the JUnit report")?;
        match &ev {
            Event::Start(e) | Event::Empty(e) => match e.name().as_ref() {
                b"testcase" if !is_spec(&attr(e, b"name")?.unwrap_or_default()) => {
                    current = None;
                    if matches!(ev, Event::Start(_)) {
                        r.read_to_end(e.name())?;
                    }
                }
                b"testcase" => {
                    let case = Case {
                        name: attr(e, b"name")?.unwrap_or_default(),
                        outcome: Outcome::Passed,
                        seconds: attr(e, b"time")?
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(0.0),
                    };
                    if matches!(ev, Event::Empty(_)) {
                        out.cases.push(case);
                    } else {
                        current = Some(case);
                    }
                }
                b"skipped" => {
                    if let Some(c) = current.as_mut() {
                        let msg = attr(e, b"message")?.unwrap_or_default();
                        c.outcome = match msg.strip_prefix("skipped - ") {
                            Some(reason) => Outcome::Skipped(reason.to_owned()),
                            None if msg == "pending" => Outcome::Skipped("pending".to_owned()),
                            None => Outcome::FilteredOut,
                        };
                    }
                }
                b"failure" | b"error" => {
                    if let Some(c) = current.as_mut() {
                        let msg = attr(e, b"message")?.unwrap_or_default();
                        c.outcome = Outcome::Failed(msg);
                    }
                }
                _ => {}
            },
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                if let Some(c) = current.take() {
                    out.cases.push(c);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// Whether a test case is a spec (ginkgo names them `[It] ...`), not a suite node such as
/// `[SynchronizedBeforeSuite]`.
fn is_spec(name: &str) -> bool {
    name.starts_with("[It]")
}

/// The report trimmed as the module docs say, the suites' `tests`, `skipped` and
/// `disabled` counts made to match.
pub fn without_filtered(xml: &str, summary: &Summary) -> Result<String> {
    let selected = summary.selected().to_string();
    let skipped = summary.skipped().to_string();
    let mut r = Reader::from_str(xml);
    let mut w = Writer::new(Vec::new());
    // Events of the test case being read; dropped at its end if it never ran.
    let mut held: Option<Vec<Event<'static>>> = None;
    let mut filtered = false;
    let mut passed = false;
    // Inside a passed spec's captured output, which is left out.
    let mut in_output = false;
    loop {
        let ev = r.read_event().context("reading the JUnit report")?;
        if matches!(ev, Event::Eof) {
            break;
        }
        match &ev {
            Event::Start(e) if e.name().as_ref() == b"testcase" => {
                held = Some(vec![ev.clone().into_owned()]);
                filtered = !is_spec(&attr(e, b"name")?.unwrap_or_default());
                passed = attr(e, b"status")?.as_deref() == Some("passed");
                continue;
            }
            Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                if is_spec(&attr(e, b"name")?.unwrap_or_default()) {
                    w.write_event(ev)?;
                }
                continue;
            }
            Event::Start(e)
                if passed
                    && held.is_some()
                    && matches!(e.name().as_ref(), b"system-err" | b"system-out") =>
            {
                in_output = true;
                continue;
            }
            Event::End(e) if in_output => {
                if matches!(e.name().as_ref(), b"system-err" | b"system-out") {
                    in_output = false;
                }
                continue;
            }
            _ if in_output => continue,
            Event::Start(e) | Event::Empty(e)
                if held.is_some() && e.name().as_ref() == b"skipped" =>
            {
                filtered = attr(e, b"message")?.as_deref() == Some("skipped");
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                if let Some(mut events) = held.take() {
                    if !filtered {
                        events.push(ev.into_owned());
                        for e in events {
                            w.write_event(e)?;
                        }
                    }
                }
                continue;
            }
            Event::Start(e) if matches!(e.name().as_ref(), b"testsuite" | b"testsuites") => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let mut s = BytesStart::new(name);
                for a in e.attributes() {
                    let a = a?;
                    let v = match a.key.as_ref() {
                        b"tests" => selected.clone(),
                        b"skipped" => skipped.clone(),
                        b"disabled" => "0".to_owned(),
                        _ => a.unescape_value()?.into_owned(),
                    };
                    s.push_attribute((
                        String::from_utf8_lossy(a.key.as_ref()).as_ref(),
                        v.as_str(),
                    ));
                }
                w.write_event(Event::Start(s))?;
                continue;
            }
            _ => {}
        }
        match held.as_mut() {
            Some(events) => events.push(ev.into_owned()),
            None => w.write_event(ev)?,
        }
    }
    Ok(String::from_utf8(w.into_inner())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" disabled="2" errors="0" failures="1" time="30">
  <testsuite name="Kubernetes e2e suite" package="/x" tests="4" disabled="2" skipped="2" errors="0" failures="1" time="30" timestamp="2026-12-06T23:00:00">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="0.1">
      <system-err>setup</system-err>
    </testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint" classname="Kubernetes e2e suite" status="passed" time="12.5">
      <system-err>log of a pass</system-err>
    </testcase>
    <testcase name="[It] [sig-network] Services should fail" classname="Kubernetes e2e suite" status="failed" time="10">
      <failure message="timed out" type="failed">stack</failure>
      <system-err>log &amp; more</system-err>
    </testcase>
    <testcase name="[It] [sig-network] SCTP should do sctp" classname="Kubernetes e2e suite" status="skipped" time="0.1">
      <skipped message="skipped - no SCTP here"></skipped>
    </testcase>
    <testcase name="[It] [sig-storage] not selected" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
  </testsuite>
</testsuites>"#;

    #[test]
    fn outcomes_tell_filtered_specs_from_specs_that_skipped_themselves() {
        let s = parse(REPORT).unwrap();
        assert_eq!(s.cases.len(), 4);
        assert_eq!(s.cases[0].outcome, Outcome::Passed);
        assert_eq!(s.cases[0].seconds, 12.5);
        assert_eq!(s.cases[1].outcome, Outcome::Failed("timed out".into()));
        assert_eq!(s.cases[2].outcome, Outcome::Skipped("no SCTP here".into()));
        assert_eq!(s.cases[3].outcome, Outcome::FilteredOut);
        assert_eq!(s.line(), "1 passed, 1 failed, 1 skipped");
        assert_eq!(s.selected(), 3);
    }

    #[test]
    fn the_trimmed_report_keeps_what_ran_and_counts_it() {
        let s = parse(REPORT).unwrap();
        let t = without_filtered(REPORT, &s).unwrap();
        assert!(!t.contains("not selected"), "{t}");
        assert!(t.contains("Services should fail"));
        assert!(
            t.contains("log &amp; more"),
            "a failure's log stays, escaped: {t}"
        );
        assert!(!t.contains("log of a pass"), "{t}");
        assert!(!t.contains("SynchronizedBeforeSuite"), "{t}");
        assert!(
            t.contains(r#"tests="3""#) && t.contains(r#"skipped="1""#),
            "{t}"
        );
        assert!(!t.contains(r#"disabled="2""#), "{t}");
        let again = parse(&t).unwrap();
        assert_eq!(again.line(), s.line());
        assert_eq!(again.cases.len(), 3);
    }
}
