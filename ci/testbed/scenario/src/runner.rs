//! Typed phases and the runner that enforces their deadlines.
//!
//! Every phase has a name and a deadline. Whatever blocks inside a phase goes through its
//! [`Cx`]: commands ([`crate::cmd::Cmd::run`]) and polls ([`Cx::wait_until`]) get at most what is
//! left of the phase (and of the whole scenario, `xvtpm_deadline` on dom0's command line); a
//! command the phase deadline cuts short is killed (its whole process group) and the phase is
//! reported FAIL naming the phase, the deadline and what was killed. The report is the contract
//! `run.sh` reads:
//!
//! ```text
//! RESULT <phase> PASS|FAIL|SKIPPED <reason>
//! MARK <phase> up=<dom0 uptime>           (run.sh turns consecutive MARKs into PHASE durations)
//! CHECK <where> <check> PASS|FAIL <detail>
//! SUMMARY pass=N fail=N skipped=N[ failed: a b]
//! ```
//!
//! A phase set that runs a second time under other conditions (the vTPM-domain phases with the
//! manager in its own domain, `mgrdom-serve`) runs with a pass suffix ([`Runner::set_suffix`],
//! e.g. `@mgrdom`): it is appended to every phase name the runner reports (`RESULT
//! vtpmdom-create@mgrdom …`, `MARK vtpmdom-create@mgrdom …`) and to the `<where>` of every CHECK
//! line ([`check`], e.g. `CHECK dom0@mgrdom …`), so the two passes' lines stay apart. Names stay
//! one word (run.sh reads `MARK ([^ ]+)`).

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skipped,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skipped => "SKIPPED",
        }
    }
}

/// What a phase says about itself.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub reason: String,
}

impl Outcome {
    pub fn pass(r: impl Into<String>) -> Self {
        Outcome {
            status: Status::Pass,
            reason: r.into(),
        }
    }
    pub fn fail(r: impl Into<String>) -> Self {
        Outcome {
            status: Status::Fail,
            reason: r.into(),
        }
    }
    pub fn skipped(r: impl Into<String>) -> Self {
        Outcome {
            status: Status::Skipped,
            reason: r.into(),
        }
    }
}

/// The failures a phase collects (its FAIL reason, joined by spaces), and its CHECK lines.
#[derive(Debug, Default)]
pub struct Errs(Vec<String>);

impl Errs {
    pub fn add(&mut self, s: impl Into<String>) {
        self.0.push(s.into());
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn joined(&self) -> String {
        self.0.join(" ")
    }
    /// `CHECK dom0 <name> PASS|FAIL <detail>`; a FAIL adds `name`.
    pub fn check(&mut self, name: &str, ok: bool, detail: impl AsRef<str>) -> bool {
        self.check_or(name, ok, detail, name)
    }
    /// `CHECK dom0 <name> PASS|FAIL <detail>`; a FAIL adds `token` (a failure named apart from
    /// its CHECK line).
    pub fn check_or(
        &mut self,
        name: &str,
        ok: bool,
        detail: impl AsRef<str>,
        token: impl Into<String>,
    ) -> bool {
        check("dom0", name, ok, detail.as_ref());
        if !ok {
            self.add(token);
        }
        ok
    }
    /// PASS with `reason` when nothing failed, else FAIL with the failures.
    pub fn verdict(&self, reason: impl Into<String>) -> Outcome {
        if self.is_empty() {
            Outcome::pass(reason)
        } else {
            Outcome::fail(self.joined())
        }
    }
}

thread_local! {
    /// The pass suffix ([`Runner::set_suffix`]); the scenario runs its phases on one thread.
    static SUFFIX: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The current pass suffix (`""` in the first pass, e.g. `@mgrdom` in a second one).
pub fn suffix() -> String {
    SUFFIX.with(|s| s.borrow().clone())
}

/// Prints a CHECK line (`<where>` with the pass suffix).
pub fn check(whr: &str, name: &str, ok: bool, detail: &str) {
    println!(
        "CHECK {whr}{} {name} {} {detail}",
        suffix(),
        if ok { "PASS" } else { "FAIL" }
    );
}

/// Prints a WHY line: what a failing phase saw of its cause (`text`'s last `n` non-empty lines,
/// joined by ` | `, at most 600 characters from their end). run.sh ends a failed run with them
/// (a CI record is often the log's last few kilobytes, and the CHECK lines say what failed, not
/// why).
pub fn why(what: &str, text: &str, n: usize) {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let joined = lines[lines.len().saturating_sub(n)..].join(" | ");
    let cut = joined.char_indices().rev().nth(599).map_or(0, |(i, _)| i);
    println!("WHY dom0{} {what}: {}", suffix(), &joined[cut..]);
}

/// dom0 uptime in seconds (the clock `xvtpm_deadline` and the MARKs are on).
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0.0)
}

/// Xen wallclock (CLOCK_REALTIME; the guests read the same PV clock), seconds with µs.
pub fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The context every phase runs in: its deadline and the scenario's.
pub struct Cx {
    scenario_end: Instant,
    phase_end: Cell<Instant>,
    overrun: RefCell<Option<String>>,
}

impl Cx {
    /// `scenario_left`: time until the scenario deadline.
    pub fn new(scenario_left: Duration) -> Self {
        let now = Instant::now();
        Cx {
            scenario_end: now + scenario_left,
            // outside a phase only the scenario deadline counts
            phase_end: Cell::new(now + Duration::from_secs(10 * 365 * 86400)),
            overrun: RefCell::new(None),
        }
    }

    /// The scenario deadline has passed (later phases report SKIPPED).
    pub fn past_deadline(&self) -> bool {
        Instant::now() >= self.scenario_end
    }

    /// Time until the scenario deadline (a phase derives its waits from it).
    pub fn scenario_left(&self) -> Duration {
        self.scenario_end.saturating_duration_since(Instant::now())
    }

    /// What a command or a wait that wants `want` gets, and whether the phase deadline (not the
    /// scenario's) cut it. The scenario's cut leaves at least 1 s (a command still gets to say why).
    pub fn limit(&self, want: Duration) -> (Duration, bool) {
        let now = Instant::now();
        let scen = self
            .scenario_end
            .saturating_duration_since(now)
            .max(Duration::from_secs(1));
        let phase = self.phase_end.get().saturating_duration_since(now);
        let w = want.min(scen);
        if phase < w { (phase, true) } else { (w, false) }
    }

    /// Records that the phase deadline cut something short (the phase then FAILs).
    pub fn note_overrun(&self, what: &str) {
        let mut o = self.overrun.borrow_mut();
        if o.is_none() {
            *o = Some(what.to_string());
        }
    }

    /// Polls `f` every 0.2 s for up to `secs` (cut to the deadlines); true once it holds.
    pub fn wait_until(&self, secs: u64, f: impl FnMut() -> bool) -> bool {
        self.wait_every(secs, Duration::from_millis(200), f)
    }

    pub fn wait_every(&self, secs: u64, every: Duration, mut f: impl FnMut() -> bool) -> bool {
        let (lim, cut) = self.limit(Duration::from_secs(secs));
        let end = Instant::now() + lim;
        loop {
            if f() {
                return true;
            }
            if Instant::now() >= end {
                if cut {
                    self.note_overrun(&format!("a wait of {secs} s"));
                }
                return false;
            }
            std::thread::sleep(every);
        }
    }
}

/// One phase's verdict as reported.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub name: String,
    pub status: Status,
    /// What the RESULT line said (the tests read it back).
    #[cfg_attr(not(test), allow(dead_code))]
    pub reason: String,
}

pub struct Runner {
    pub cx: Cx,
    pub results: Vec<PhaseResult>,
    /// Xen's triple-fault lines so far ([`crate::xen::triple_faults`]; the tests give their own).
    pub faults: Box<dyn FnMut() -> Vec<String>>,
}

impl Runner {
    pub fn new(scenario_left: Duration) -> Self {
        Runner {
            cx: Cx::new(scenario_left),
            results: Vec::new(),
            faults: Box::new(crate::xen::triple_faults),
        }
    }

    /// From now on every phase name reported gets `suffix` appended, and every CHECK line's
    /// `<where>` too (`""`: none). It must not contain blanks: run.sh reads names as one word.
    pub fn set_suffix(&mut self, suffix: &str) {
        assert!(
            !suffix.contains(char::is_whitespace),
            "a pass suffix is part of a phase name: no blanks ({suffix:?})"
        );
        SUFFIX.with(|s| *s.borrow_mut() = suffix.to_string());
    }

    /// Runs phase `name` with `deadline`; prints its RESULT and MARK lines.
    ///
    /// A phase that FAILs while Xen reset a guest for a triple fault (`xl dmesg`: `dNvM Triple
    /// fault - invoking HVM shutdown action 1`) runs once more, and the second verdict is the
    /// phase's (its reason names the first). Under the testbed's nested TCG an HVM guest that is
    /// saved or migrated now and then triple-faults (seen in hvm-migrate and migrate-xhost-hvm:
    /// the guest being saved, or the one just restored, reset and booted anew), a fault of the
    /// emulated CPU that no part of the product can cause or prevent (the vTPM never touches a
    /// guest's memory); xl-vtpm's part is to say that the guest rebooted and nothing moved.
    pub fn phase(
        &mut self,
        name: &str,
        deadline: Duration,
        mut f: impl FnMut(&Cx) -> Outcome,
    ) -> Status {
        let before = (self.faults)();
        let first = self.attempt(name, deadline, &mut f);
        if first.status != Status::Fail {
            return self.report(name, first);
        }
        let new: Vec<String> = (self.faults)().into_iter().filter(|l| !before.contains(l)).collect();
        if new.is_empty() || self.cx.past_deadline() {
            return self.report(name, first);
        }
        let (said, faults): (String, String) = (first.reason.chars().take(300).collect(), new.join(" | "));
        println!("INFO {name}{}: FAILED while Xen reset a guest for a triple fault ({faults}): the phase runs once more; it said: {said}", suffix());
        let mut second = self.attempt(name, deadline, &mut f);
        second.reason = format!("{} (second attempt: the first FAILED while Xen reset a guest for a triple fault: {faults})", second.reason);
        self.report(name, second)
    }

    /// One run of phase `name`'s body (a panic and an overrun deadline are FAILs).
    fn attempt(
        &mut self,
        name: &str,
        deadline: Duration,
        f: &mut impl FnMut(&Cx) -> Outcome,
    ) -> Outcome {
        let full = format!("{name}{}", suffix());
        let t0 = Instant::now();
        self.cx.phase_end.set(t0 + deadline);
        *self.cx.overrun.borrow_mut() = None;
        let got = catch_unwind(AssertUnwindSafe(|| f(&self.cx)));
        let elapsed = t0.elapsed();
        self.cx
            .phase_end
            .set(t0 + Duration::from_secs(10 * 365 * 86400));
        let mut out = match got {
            Ok(o) => o,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                Outcome::fail(format!("the phase panicked: {msg}"))
            }
        };
        // a phase over its deadline FAILs whatever it said (grace: the reporting after the last wait)
        let over = self.cx.overrun.borrow_mut().take();
        let late = elapsed > deadline + Duration::from_secs(2);
        if over.is_some() || late {
            let what = over.unwrap_or_else(|| format!("took {:.1} s", elapsed.as_secs_f64()));
            out = Outcome::fail(format!(
                "phase {full} overran its deadline of {} s ({what}); it said: {} {}",
                deadline.as_secs(),
                out.status.word(),
                out.reason
            ));
        }
        out
    }

    /// A phase that does not run (disabled, or what it needs failed).
    pub fn skip(&mut self, name: &str, why: &str) -> Status {
        self.report(name, Outcome::skipped(why))
    }

    /// Every phase of a disabled section, SKIPPED with `why`.
    pub fn skip_all(&mut self, names: &[&str], why: &str) {
        for n in names {
            self.skip(n, why);
        }
    }

    /// Phase `name` unless something it needs is missing (`blocked`: SKIPPED with that reason)
    /// or the scenario deadline has passed (SKIPPED: "scenario deadline reached").
    pub fn phase_if(
        &mut self,
        name: &str,
        blocked: Option<&str>,
        deadline: Duration,
        f: impl FnMut(&Cx) -> Outcome,
    ) -> Status {
        if let Some(why) = blocked {
            self.skip(name, why)
        } else if self.cx.past_deadline() {
            self.skip(name, "scenario deadline reached")
        } else {
            self.phase(name, deadline, f)
        }
    }

    /// A verdict reached without running the phase's body (e.g. FAIL of a required phase).
    pub fn verdict(&mut self, name: &str, out: Outcome) -> Status {
        self.report(name, out)
    }

    fn report(&mut self, name: &str, out: Outcome) -> Status {
        let name = format!("{name}{}", suffix());
        println!("RESULT {name} {} {}", out.status.word(), out.reason);
        println!("MARK {name} up={:.2}", uptime());
        self.results.push(PhaseResult {
            name,
            status: out.status,
            reason: out.reason,
        });
        out.status
    }

    pub fn count(&self, s: Status) -> usize {
        self.results.iter().filter(|r| r.status == s).count()
    }

    pub fn failed(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|r| r.status == Status::Fail)
            .map(|r| r.name.clone())
            .collect()
    }

    /// `SUMMARY pass=N fail=N skipped=N[ failed: a b]`
    pub fn summary(&self) -> String {
        let f = self.failed();
        let tail = if f.is_empty() {
            String::new()
        } else {
            format!(" failed: {}", f.join(" "))
        };
        format!(
            "SUMMARY pass={} fail={} skipped={}{tail}",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Skipped)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{Cmd, pid_up};

    #[test]
    fn a_phase_that_fails_with_a_guest_s_triple_fault_runs_once_more() {
        let mut r = Runner::new(Duration::from_secs(600));
        // Xen's ring: one fault more at every look (d1, then d1 d2, …)
        let looks = std::rc::Rc::new(Cell::new(0u32));
        let l = looks.clone();
        r.faults = Box::new(move || {
            l.set(l.get() + 1);
            (1..=l.get()).map(|d| format!("(XEN) d{d}v0 Triple fault - invoking HVM shutdown action 1")).collect()
        });
        let mut runs = 0;
        let st = r.phase("hvm-phase", Duration::from_secs(60), |_| {
            runs += 1;
            if runs == 1 { Outcome::fail("guest-gone") } else { Outcome::pass("moved") }
        });
        assert_eq!((st, runs), (Status::Pass, 2));
        let res = &r.results[0];
        assert!(res.reason.starts_with("moved (second attempt") && res.reason.contains("d2v0 Triple fault") && !res.reason.contains("d1v0"), "{}", res.reason);
        // run once more only: the second verdict stands
        let mut runs = 0;
        let st = r.phase("hvm-phase-2", Duration::from_secs(60), |_| {
            runs += 1;
            Outcome::fail("still broken")
        });
        assert_eq!((st, runs), (Status::Fail, 2));
        assert!(r.results[1].reason.starts_with("still broken (second attempt"), "{}", r.results[1].reason);
        // no new fault: a FAIL is not run again, a PASS never is
        r.faults = Box::new(|| vec!["(XEN) d2v0 Triple fault - invoking HVM shutdown action 1".to_string()]);
        let mut runs = 0;
        let st = r.phase("pv-phase", Duration::from_secs(60), |_| {
            runs += 1;
            Outcome::fail("broken")
        });
        assert_eq!((st, runs), (Status::Fail, 1));
        assert_eq!(r.results.len(), 3, "one RESULT per phase");
        assert_eq!(looks.get(), 4);
    }

    #[test]
    fn a_phase_over_its_deadline_is_killed_and_fails_by_name() {
        let mut r = Runner::new(Duration::from_secs(600));
        let pidfile = tempfile::NamedTempFile::new().unwrap();
        let pf = pidfile.path().to_str().unwrap().to_string();
        let t0 = Instant::now();
        let st = r.phase("slow-phase", Duration::from_secs(1), |cx| {
            // a child that would run 30 s, with a grandchild in its process group
            let o = Cmd::new(&["sh", "-c", &format!("sleep 30 & echo $! > {pf}; wait")])
                .secs(60)
                .run(cx);
            Outcome::pass(format!("rc {}", o.rc))
        });
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the phase was not cut at its deadline"
        );
        assert_eq!(st, Status::Fail);
        let res = &r.results[0];
        assert_eq!(res.name, "slow-phase");
        assert!(
            res.reason
                .contains("phase slow-phase overran its deadline of 1 s"),
            "{}",
            res.reason
        );
        // the grandchild went with the group
        let gc: u32 = std::fs::read_to_string(pidfile.path())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            r.cx.wait_until(5, || !pid_up(Some(gc))),
            "sleep {gc} survived the kill"
        );
        assert_eq!(
            r.summary(),
            "SUMMARY pass=0 fail=1 skipped=0 failed: slow-phase"
        );
    }

    #[test]
    fn a_wait_over_the_deadline_fails_the_phase() {
        let mut r = Runner::new(Duration::from_secs(600));
        let st = r.phase("waits", Duration::from_secs(1), |cx| {
            let ok = cx.wait_until(30, || false);
            Outcome::pass(format!("waited: {ok}"))
        });
        assert_eq!(st, Status::Fail);
        assert!(
            r.results[0].reason.contains("phase waits overran"),
            "{}",
            r.results[0].reason
        );
    }

    #[test]
    fn a_failing_check_fails_the_phase_and_the_others_keep_their_verdicts() {
        let mut r = Runner::new(Duration::from_secs(600));
        r.phase("good", Duration::from_secs(30), |cx| {
            let o = Cmd::new(&["sh", "-c", "echo hello; exit 0"]).run(cx);
            let mut e = Errs::default();
            e.check("said-hello", o.ok() && o.stdout == "hello\n", &o.stdout);
            e.verdict("said hello")
        });
        r.phase("bad", Duration::from_secs(30), |cx| {
            let o = Cmd::new(&["sh", "-c", "exit 7"]).run(cx);
            let mut e = Errs::default();
            e.check("exit-0", o.ok(), format!("exit {}", o.rc));
            e.verdict("exited 0")
        });
        r.phase("boom", Duration::from_secs(30), |_| panic!("oops"));
        r.skip("later", "disabled");
        let v: Vec<(&str, Status)> = r
            .results
            .iter()
            .map(|p| (p.name.as_str(), p.status))
            .collect();
        assert_eq!(
            v,
            [
                ("good", Status::Pass),
                ("bad", Status::Fail),
                ("boom", Status::Fail),
                ("later", Status::Skipped)
            ]
        );
        assert_eq!(r.results[1].reason, "exit-0");
        assert!(r.results[2].reason.contains("panicked: oops"));
        assert_eq!(
            r.summary(),
            "SUMMARY pass=1 fail=2 skipped=1 failed: bad boom"
        );
    }

    #[test]
    fn a_blocked_or_late_phase_is_skipped_without_running() {
        let mut r = Runner::new(Duration::from_secs(600));
        let mut ran = Vec::new();
        r.phase_if(
            "needs-a",
            Some("no a (a failed)"),
            Duration::from_secs(5),
            |_| {
                ran.push("needs-a");
                Outcome::pass("ran")
            },
        );
        r.phase_if("free", None, Duration::from_secs(5), |_| {
            ran.push("free");
            Outcome::pass("ran")
        });
        r.skip_all(&["off-1", "off-2"], "disabled");
        let mut late = Runner::new(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        late.phase_if("late", None, Duration::from_secs(5), |_| {
            ran.push("late");
            Outcome::pass("ran")
        });
        assert_eq!(ran, ["free"]);
        let v: Vec<(&str, Status, &str)> = r
            .results
            .iter()
            .chain(late.results.iter())
            .map(|p| (p.name.as_str(), p.status, p.reason.as_str()))
            .collect();
        assert_eq!(
            v,
            [
                ("needs-a", Status::Skipped, "no a (a failed)"),
                ("free", Status::Pass, "ran"),
                ("off-1", Status::Skipped, "disabled"),
                ("off-2", Status::Skipped, "disabled"),
                ("late", Status::Skipped, "scenario deadline reached"),
            ]
        );
    }

    #[test]
    fn a_second_pass_reports_its_phases_under_suffixed_names() {
        let mut r = Runner::new(Duration::from_secs(600));
        r.phase("create", Duration::from_secs(5), |_| Outcome::pass("first"));
        r.set_suffix("@mgrdom");
        assert_eq!(suffix(), "@mgrdom");
        r.phase("create", Duration::from_secs(5), |_| Outcome::pass("second"));
        r.skip_all(&["later"], "disabled");
        r.phase_if("blocked", Some("no manager"), Duration::from_secs(5), |_| {
            Outcome::pass("ran")
        });
        r.phase("slow", Duration::from_secs(1), |cx| {
            cx.wait_until(30, || false);
            Outcome::pass("waited")
        });
        r.set_suffix("");
        r.phase("after", Duration::from_secs(5), |_| Outcome::pass("third"));
        let v: Vec<(&str, Status)> = r
            .results
            .iter()
            .map(|p| (p.name.as_str(), p.status))
            .collect();
        assert_eq!(
            v,
            [
                ("create", Status::Pass),
                ("create@mgrdom", Status::Pass),
                ("later@mgrdom", Status::Skipped),
                ("blocked@mgrdom", Status::Skipped),
                ("slow@mgrdom", Status::Fail),
                ("after", Status::Pass),
            ]
        );
        assert!(
            r.results[4]
                .reason
                .contains("phase slow@mgrdom overran its deadline"),
            "{}",
            r.results[4].reason
        );
        assert_eq!(
            r.summary(),
            "SUMMARY pass=3 fail=1 skipped=2 failed: slow@mgrdom"
        );
    }

    #[test]
    #[should_panic(expected = "no blanks")]
    fn a_pass_suffix_with_a_blank_is_refused() {
        Runner::new(Duration::from_secs(1)).set_suffix("@mgr dom");
    }

    #[test]
    fn check_or_names_the_failure_apart_from_the_check() {
        let mut e = Errs::default();
        assert!(e.check_or("ek-stable", true, "same", "ek-changed"));
        assert!(e.is_empty());
        assert!(!e.check_or("ek-stable", false, "other", "ek-changed"));
        assert!(!e.check("vtpm-stop", false, "alive"));
        assert_eq!(e.joined(), "ek-changed vtpm-stop");
    }

    #[test]
    fn the_scenario_deadline_caps_but_does_not_fail_a_phase() {
        let r = Runner::new(Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(20));
        assert!(r.cx.past_deadline());
        let (lim, cut) = r.cx.limit(Duration::from_secs(90));
        assert_eq!((lim, cut), (Duration::from_secs(1), false));
    }
}
