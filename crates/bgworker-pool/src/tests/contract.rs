//! Jobs, their events, ids, status, stats, and bad input.

use super::Fixture;

#[test]
fn a_job_runs_with_its_arguments_and_its_results_come_back() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        id = submit(p, function(a, t) return a + t.n, {a, t.s}, nil, 2.5 end, 40, { n = 2, s = "x" })
        "#,
    );
    f.serve_until("outcome(id)");
    assert!(f.eval::<bool>(
        r#"
        local e = outcome(id)
        return id == 1 and e[1] == "done" and e.n == 5 and e[2] == 42 and math.type(e[2]) == "integer"
          and e[3][1] == 40 and e[3][2] == "x" and e[4] == nil and e[5] == 2.5 and #events[id] == 1
        "#
    ));
}

#[test]
fn ids_are_unique_integers_and_status_follows_each_job() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        blocker = submit(p, function() os.execute("sleep 0.2") end)
        quick = submit(p, function() return "quick" end)
        "#,
    );
    assert_eq!(f.eval::<(i64, i64)>("return blocker, quick"), (1, 2));
    f.wait_until("p:status(blocker) == 'running'");
    assert_eq!(f.eval::<String>("return p:status(quick)"), "queued");
    assert_eq!(
        f.eval::<(Option<String>, Option<String>, Option<String>)>("return p:status(0), p:status(3), p:status(1.5)"),
        (None, None, None)
    );
    // Its function ended on the worker (the one worker runs the next job),
    // but its outcome was not decoded here yet: still running.
    f.exec("marker = submit(p, function() os.execute('sleep 0.2') end)");
    f.wait_until("p:status(marker) == 'running'");
    assert_eq!(f.eval::<String>("return p:status(quick)"), "running");
    f.serve_until("outcome(quick)");
    assert_eq!(
        f.eval::<(String, String)>("return p:status(blocker), p:status(quick)"),
        ("finished".into(), "finished".into())
    );
}

#[test]
fn an_error_value_arrives_as_itself_with_a_traceback() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        structured = submit(p, function() error({ code = 42, tags = { "a" } }) end)
        plain = submit(p, function() error("plain message") end)
        opaque = submit(p, function() error(print) end)
        none = submit(p, function() error() end)
        "#,
    );
    f.serve_until("outcome(none)");
    f.exec(
        r#"
        local e = outcome(structured)
        assert(e[1] == "failed" and e.n == 3, "failed, err, traceback")
        assert(type(e[2]) == "table" and e[2].code == 42 and e[2].tags[1] == "a", "the table itself")
        assert(e[3]:find("^stack traceback:") and e[3]:find("in function 'error'"), e[3])
        assert(not e[3]:find("bgworker.pool.worker", 1, true), "no frame of the worker's own code: " .. e[3])
        e = outcome(plain)
        assert(type(e[2]) == "string" and e[2]:find("plain message", 1, true), e[2])
        e = outcome(opaque)
        assert(type(e[2]) == "string" and e[2]:find("^function: "), "described: " .. tostring(e[2]))
        e = outcome(none)
        assert(e[1] == "failed" and e[2] == nil and type(e[3]) == "string")
        "#,
    );
}

#[test]
fn values_that_cannot_cross_say_which_and_where() {
    let f = Fixture::new(None);
    let refused: (Option<i64>, i64, String) = f.eval(
        r#"
        p = new_pool()
        return submit(p, function() end, 1, { f = print })
        "#,
    );
    assert_eq!(refused, (None, 2, "a function at .f cannot be copied to a worker".into()));
    f.exec("id = submit(p, function() return 1, coroutine.create(print) end)");
    f.serve_until("outcome(id)");
    // Nothing raised, so there is no traceback: nil, not an empty string.
    let (event, message, traceback): (String, String, Option<String>) =
        f.eval("local e = outcome(id) return e[1], e[2], e[3]");
    assert_eq!((event.as_str(), traceback), ("failed", None));
    assert_eq!(message, "result #2: a coroutine cannot be copied back from the worker");
}

/// MAX_VALUES results cross; one more fails the job, and as many values
/// in a progress raise in the job; the other jobs are not touched
/// (pool_spec.lua shows it for jobs whose outcomes cross in one carrier,
/// on every Lua version).
#[test]
fn too_many_values_fail_their_job_only() {
    let f = Fixture::new(None);
    f.exec(&format!(
        r#"
        max = {}
        p = new_pool()
        local function values(n, report)
          local t = {{}}
          for i = 1, n do t[i] = i end
          if report then require("bgworker.worker").progress(table.unpack(t, 1, n)) end
          return table.unpack(t, 1, n)
        end
        before = submit(p, function() return "before" end)
        fit = submit(p, values, max)
        results = submit(p, values, max + 1)
        progress = submit(p, values, max + 1, true)
        after = submit(p, function() return "after" end)
        "#,
        crate::worker::value::MAX_VALUES
    ));
    f.serve_until("outcome(after)");
    f.exec(
        r#"
        assert(outcome(before)[2] == "before" and outcome(after)[2] == "after")
        local e = outcome(fit)
        assert(e[1] == "done" and e.n == max + 1 and e[max + 1] == max)
        e = outcome(results)
        assert(e[1] == "failed" and e[3] == nil, e[2])
        assert(e[2] == ("%d results cannot be copied back from the worker: at most %d can (return them in a table)")
          :format(max + 1, max), e[2])
        e = outcome(progress)
        assert(e[1] == "failed" and #events[progress] == 1, "no progress event")
        assert(e[2]:find(("'progress' got %d values: at most %d can cross"):format(max + 1, max), 1, true), e[2])
        local s = p:stats()
        assert(s.done == 3 and s.failed == 2 and s.cancelled == 0)
        "#,
    );
}

#[test]
fn named_functions_are_required_in_the_worker() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        rep = p:queue("string.rep", "ab", 3)
        missing = p:queue("nosuchmodule.f")
        notfn = p:queue("string.nothing")
        "#,
    );
    f.serve_until("outcome(notfn)");
    f.exec(
        r#"
        assert(outcome(rep)[2] == "ababab")
        assert(outcome(missing)[1] == "failed" and outcome(missing)[2]:find("nosuchmodule", 1, true))
        assert(outcome(notfn)[2] == "'string.nothing' is not a function: module 'string' has no function 'nothing'")
        "#,
    );
}

#[test]
fn stats_count_every_job_once_and_time_them() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        for i = 1, 20 do submit(p, function(i) if i % 4 == 0 then error("no") end return i end, i) end
        "#,
    );
    // One snapshot: two `stats()` calls could see a job queued, then running.
    f.serve_until("(function() local s = p:stats() return s.running + s.queued == 0 end)()");
    f.exec(
        r#"
        local s = p:stats()
        assert(s.threads == 2 and s.submitted == 20 and s.done == 15 and s.failed == 5 and s.cancelled == 0, "counts")
        assert(s.wait_max >= s.wait_mean and s.wait_mean > 0, "waits")
        assert(s.run_max >= s.run_mean and s.run_mean > 0, "runs")
        assert(math.type(s.submitted) == "integer" and math.type(s.run_mean) == "float")
        "#,
    );
}

#[test]
fn stats_stay_consistent_while_jobs_move() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        cancels = 0
        for i = 1, 2000 do
          local id = submit(p, function(i) return i end, i)
          if i % 3 == 0 and p:cancel(id) then cancels = cancels + 1 end
        end
        checks = 0
        function consistent()
          local s = p:stats()
          checks = checks + 1
          assert(s.queued + s.running + s.done + s.failed + s.cancelled == s.submitted, "inconsistent")
          return s.queued + s.running == 0
        end
        "#,
    );
    f.serve_until("consistent()");
    assert!(f.eval::<i64>("return checks") > 1);
    assert!(f.eval::<bool>("local s = p:stats() return s.cancelled == cancels and s.done == 2000 - cancels"));
}

#[test]
fn a_closed_pool_refuses_jobs_and_reports_no_threads() {
    let f = Fixture::new(None);
    let message: String = f.eval(
        r#"
        p = new_pool()
        assert(p:close(1) == true)
        assert(p:stats().threads == 0)
        local ok, err = pcall(submit, p, function() end)
        return tostring(err)
        "#,
    );
    assert!(message.contains("the pool is closed"), "{message}");
}

#[test]
fn bad_options_and_arguments_are_refused_by_name() {
    let f = Fixture::new(None);
    let error = |code: &str| -> String {
        f.eval(&format!("local ok, err = pcall(function() {code} end) assert(not ok) return tostring(err)"))
    };
    let opts = "path = '', cpath = '', on_events = print";
    assert!(error("native.new()").contains("bad argument #1 to 'new' (table expected, got nil)"));
    assert!(error(&format!("native.new {{ threads = 0, {opts} }}")).contains("opts.threads must be in 1..1024, got 0"));
    assert!(error("native.new { threads = 1, path = '', cpath = '' }").contains("opts.on_events must be a function"));
    assert!(error(&format!("native.new {{ threads = 1, {opts}, colour = 1 }}")).contains("unknown option colour"));
    assert!(error(&format!("native.new {{ threads = 1, {opts}, init_timeout = -1 }}"))
        .contains("opts.init_timeout must be >= 0"));
    f.exec("p = new_pool()");
    // Called as methods, so Lua does not count the pool: it is argument #1.
    assert!(error("p:close(-1)").contains("bad argument #1 to 'close' (timeout must be >= 0, got -1)"));
    assert!(error("p:close('soon')").contains("bad argument #1 to 'close' (number expected, got string)"));
    assert!(error("p:cancel({})").contains("bad argument #1 to 'cancel' (job id expected, got table)"));
    assert!(error("p.status(1, 2)").contains("bad argument #1 to 'status' (pool expected, got number"));
    assert!(
        f.eval::<bool>("return select(3, p:queue(1)) == \"function or 'module.function' string expected, got number\"")
    );
    assert!(f.eval::<bool>("return p:cancel(-1) == false and p:cancel(2^70) == false"));
}

#[test]
fn queue_refuses_a_function_argument_wherever_it_is() {
    let f = Fixture::new(None);
    f.exec(
        r##"
        p = new_pool()
        local count = function(...) return select("#", ...) end
        counted = p:queue(count, 1, 2)
        last = table.pack(p:queue(count, 1, 2, print))
        first = table.pack(p:queue(count, coroutine.create(print), print))
        "##,
    );
    f.serve_until("outcome(counted)");
    assert!(f.eval::<bool>("return outcome(counted)[2] == 2"));
    // A last function is an argument like any other: it cannot cross.
    assert!(f.eval::<bool>(
        "return last.n == 3 and last[1] == nil and last[2] == 3 and last[3]:find('a function', 1, true) == 1"
    ));
    assert!(f.eval::<bool>(
        "return first.n == 3 and first[1] == nil and first[2] == 1 and first[3]:find('cannot be copied') ~= nil"
    ));
}

#[test]
fn new_closures_run_their_own_function_however_alike() {
    let f = Fixture::new(None);
    // Closures made anew per job, of prototypes that differ only in a
    // constant, written on one line (same source and lines: only their
    // dumps tell them apart), with functions held and given again between.
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        local held = function() return "held" end
        expected, ids = {}, {}
        for i = 1, 300 do
          local fs = { function() return "a" end, function() return "b" end, held, function(x) return x end }
          local k = i % #fs + 1
          ids[i] = submit(p, fs[k], "x")
          expected[i] = ({ "a", "b", "held", "x" })[k]
        end
        "#,
    );
    f.serve_until("p:stats().done == 300");
    f.exec(
        r#"
        for i = 1, 300 do
          local e = outcome(ids[i])
          assert(e[1] == "done" and e[2] == expected[i], "job " .. i .. ": " .. tostring(e[2]))
        end
        "#,
    );
}

#[test]
fn a_closure_runs_with_the_values_its_upvalues_had_when_queued() {
    let f = Fixture::new(None);
    // One closure given again (recognised by address) and new ones (by
    // dump), over a variable that changes between jobs, and a table that
    // each job changes in the worker: the changes stay there.
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        local n, seen = 0, { count = 0 }
        local held = function() seen.count = seen.count + 1 return n, seen.count end
        ids = {}
        for i = 1, 200 do
          n = i
          ids[i] = submit(p, i % 2 == 0 and held or function() return n * 10, seen.count end)
        end
        caller_count = seen.count
        "#,
    );
    f.serve_until("p:stats().done == 200");
    f.exec(
        r#"
        assert(caller_count == 0)
        for i = 1, 200 do
          local e = outcome(ids[i])
          local want = i % 2 == 0 and i or i * 10
          assert(e[1] == "done" and e[2] == want, "job " .. i .. ": " .. tostring(e[2]))
          assert(e[3] == (i % 2 == 0 and 1 or 0), "job " .. i .. ": a copy per job")
        end
        "#,
    );
}

#[test]
fn queue_refuses_a_function_that_cannot_move_as_position_0() {
    let f = Fixture::new(None);
    f.exec("p = new_pool(); local up = io.stdout; closure = function() return up end");
    for (call, message) in [
        ("p:queue(closure)", "a userdata at upvalue 'up' cannot be copied to a worker (upvalues are copied"),
        ("p:queue(print)", "a C function cannot move to a worker"),
        ("p:queue('nodot')", "'module.function' expected, got 'nodot'"),
        ("p:queue({})", "function or 'module.function' string expected, got table"),
    ] {
        let (id, position, got): (Option<i64>, i64, String) = f.eval(&format!("return {call}"));
        assert!(id.is_none() && position == 0 && got.starts_with(message), "{call}: {got}");
    }
    assert!(
        f.eval::<bool>("return native.refusal(closure):find(\"upvalue 'up'\") ~= nil and native.refusal(print) ~= nil")
    );
    assert!(f.eval::<bool>("local n = 1 return native.refusal(function() return n end) == nil"));
    assert!(f.eval::<bool>("return native.refusal(function() return x end) == nil and native.refusal('a.b') == nil"));
}
