//! Cancelling jobs: queued, running (in Lua, past its own pcalls, inside
//! coroutines, blocked in C), and ended. A pool of one thread tells that a
//! cancelled job really stopped: the next job runs.

use std::time::Duration;

use super::Fixture;
use crate::lua::events::BATCH;

/// Submit `body` (a Lua function expression) to `p` as `victim`, wait
/// until it runs, cancel it, and check its worker then runs the next job.
fn cancel_running(f: &Fixture, body: &str) {
    f.exec(&format!("victim = submit(p, {body})"));
    f.wait_until("p:status(victim) == 'running'");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(f.eval::<String>("return p:cancel(victim)"), "running", "{body}");
    f.exec("after = submit(p, function() return 'after' end)");
    f.serve_until("outcome(after)");
    assert!(f.eval::<bool>("return events[victim] == nil and p:status(victim) == 'finished'"), "{body}");
}

#[test]
fn a_queued_job_is_cancelled_and_never_runs() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        blocker = submit(p, function() while true do end end)
        queued = submit(p, function() ran = true end)
        "#,
    );
    f.wait_until("p:status(blocker) == 'running'");
    assert_eq!(
        f.eval::<(String, String, bool)>("return p:cancel(queued), p:status(queued), p:cancel(queued)"),
        ("queued".into(), "finished".into(), false)
    );
    assert_eq!(f.eval::<String>("return p:cancel(blocker)"), "running");
    f.exec("check = submit(p, function() return ran == nil end)");
    f.serve_until("outcome(check)");
    assert!(f.eval::<bool>("return outcome(check)[2] == true and events[queued] == nil"));
    assert_eq!(f.eval::<(i64, i64, i64)>("local s = p:stats() return s.cancelled, s.done, s.running"), (2, 1, 0));
}

#[test]
fn a_cpu_bound_loop_stops() {
    let f = Fixture::new(None);
    f.exec("p = new_pool()");
    cancel_running(&f, "function() while true do end end");
    cancel_running(&f, "function() local s = 0 for i = 1, math.huge do s = s + i % 7 end return s end");
}

#[test]
fn the_cancellation_is_not_swallowed_by_the_jobs_own_protected_calls() {
    let f = Fixture::new(None);
    f.exec("p = new_pool()");
    cancel_running(&f, "function() while true do pcall(function() while true do end end) end end");
    cancel_running(
        &f,
        "function() while true do xpcall(function() while true do end end, function(e) return e end) end end",
    );
    cancel_running(&f, "function() while true do pcall(error, 'inner') end end");
    cancel_running(
        &f,
        "function() while true do coroutine.resume(coroutine.create(function() while true do end end)) end end",
    );
    cancel_running(&f, "function() while true do pcall(coroutine.wrap(function() while true do end end)) end end");
    // Nested: a coroutine whose pcall runs a coroutine that loops.
    cancel_running(
        &f,
        r#"function()
          local inner = coroutine.wrap(function() while true do pcall(function() while true do end end) end end)
          while true do coroutine.resume(coroutine.create(function() pcall(inner) end)) end
        end"#,
    );
}

#[test]
fn a_coroutine_suspended_in_a_loop_still_serves_its_resumer() {
    // The resumer loops; the coroutine it resumed yields back each time.
    let f = Fixture::new(None);
    f.exec("p = new_pool()");
    cancel_running(
        &f,
        r#"function()
          local co = coroutine.wrap(function() while true do coroutine.yield() end end)
          while true do co() end
        end"#,
    );
}

#[test]
fn close_variables_run_when_a_job_is_cancelled() {
    let f = Fixture::new(None);
    f.exec("p = new_pool()");
    cancel_running(
        &f,
        r#"function()
          local guard <close> = setmetatable({}, { __close = function(_, err) closed = tostring(err) end })
          while true do end
        end"#,
    );
    cancel_running(
        &f,
        r#"function()
          local co = coroutine.create(function()
            local guard <close> = setmetatable({}, { __close = function() closed_in_coroutine = true end })
            while true do end
          end)
          coroutine.resume(co)
        end"#,
    );
    f.exec("check = submit(p, function() return closed, closed_in_coroutine end)");
    f.serve_until("outcome(check)");
    let (closed, in_coroutine): (String, bool) = f.eval("return outcome(check)[2], outcome(check)[3]");
    assert_eq!(closed, "bgworker.pool: the job was cancelled");
    assert!(in_coroutine);
}

#[test]
fn a_cancelled_job_sees_it_in_its_error_handler() {
    let f = Fixture::new(None);
    f.exec("p = new_pool()");
    cancel_running(
        &f,
        r#"function()
          local worker = require "bgworker.worker"
          xpcall(function() while true do end end, function() seen = worker.cancelled() end)
        end"#,
    );
    f.exec("check = submit(p, function() return seen, require('bgworker.worker').cancelled() end)");
    f.serve_until("outcome(check)");
    assert_eq!(f.eval::<(bool, bool)>("return outcome(check)[2], outcome(check)[3]"), (true, false));
}

#[test]
fn a_job_blocked_in_c_ends_when_the_call_returns_and_its_result_is_dropped() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        victim = submit(p, function() os.execute("sleep 0.3") return "late" end)
        "#,
    );
    f.wait_until("p:status(victim) == 'running'");
    assert_eq!(f.eval::<String>("return p:cancel(victim)"), "running");
    f.exec("after = submit(p, function() return 'after' end)");
    f.serve_until("outcome(after)");
    assert!(f.eval::<bool>("return events[victim] == nil"));
}

#[test]
fn an_ended_job_or_an_unknown_id_cannot_be_cancelled() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        done = submit(p, function() return 1 end)
        failed = submit(p, function() error("x") end)
        "#,
    );
    f.serve_until("outcome(failed)");
    // On its way: produced by the worker, waiting in the core, not decoded.
    f.exec("produced = submit(p, function() return 'on its way' end)");
    f.wait_until("require('bgworker.core').pending() == 1");
    assert_eq!(
        f.eval::<(bool, bool, bool, bool)>("return p:cancel(done), p:cancel(failed), p:cancel(produced), p:cancel(99)"),
        (false, false, false, false)
    );
    f.serve_until("outcome(produced)");
    assert_eq!(f.eval::<String>("return outcome(produced)[2]"), "on its way");
}

#[test]
fn after_a_cancel_no_event_of_the_job_arrives() {
    let f = Fixture::new(None);
    // BATCH + 1 progress events: the last asks for a second carrier, so two
    // items in the core say that all of them wait there, undecoded.
    f.exec(&format!(
        r#"
        p = new_pool()
        victim = submit(p, function()
          local worker = require "bgworker.worker"
          for i = 1, {} do worker.progress(i) end
          while true do end
        end)
        "#,
        BATCH + 1
    ));
    f.wait_until("require('bgworker.core').pending() == 2");
    assert_eq!(f.eval::<String>("return p:cancel(victim)"), "running");
    f.exec("after = submit(p, function() return 'after' end)");
    f.serve_until("outcome(after)");
    assert!(f.eval::<bool>("return events[victim] == nil"));
}
