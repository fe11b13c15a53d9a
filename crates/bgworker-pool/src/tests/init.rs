//! A pool's init: once per worker before any job; failure and timeout.

use std::thread;
use std::time::{Duration, Instant};

use super::Fixture;

#[test]
fn init_runs_once_in_each_worker_before_any_job() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool {
          threads = 3,
          init = function()
            inits = (inits or 0) + 1
            cancelled_in_init = require("bgworker.worker").cancelled()
          end,
        }
        ids = {}
        for i = 1, 12 do ids[i] = submit(p, function() return inits, cancelled_in_init end) end
        "#,
    );
    f.serve_until("p:stats().done == 12");
    f.exec(
        r#"
        for i = 1, 12 do
          local e = outcome(ids[i])
          assert(e[1] == "done" and e[2] == 1 and e[3] == false, "job " .. i)
        end
        "#,
    );
}

#[test]
fn a_named_init_is_required_and_called() {
    let f = Fixture::new(None);
    assert!(f.eval::<bool>("return new_pool { init = 'os.time' } ~= nil"));
    let err: String = f.eval("return select(2, new_pool { init = 'os.nothing' })");
    assert_eq!(err, "'os.nothing' is not a function: module 'os' has no function 'nothing'");
}

#[test]
fn a_failing_init_stops_every_worker_and_returns_its_error() {
    let f = Fixture::new(None);
    let (made, error_code, traceback): (bool, i64, String) = f.eval(
        r#"
        marks = os.tmpname()
        os.remove(marks)
        assert(os.execute("mkdir " .. marks))
        -- An init gets no arguments: the directory is baked into its code.
        -- Each worker's init marks "c-<id>" for when its state closes, then
        -- "a-<id>" (it ran), then fails; the first failure interrupts the
        -- others, maybe before they marked anything.
        local init = load(("local dir = %q\n"):format(marks) .. [[
          local name = os.tmpname()
          os.remove(name)
          local id = name:match("[^/]+$")
          _G.marker = setmetatable({}, { __gc = function()
            os.execute("sleep 0.2") -- a slow close, which new must wait for
            assert(io.open(dir .. "/c-" .. id, "w")):close()
          end })
          assert(io.open(dir .. "/a-" .. id, "w")):close()
          error({ code = 7 })
        ]])
        local p, err, tb = new_pool { threads = 3, init = init }
        return p ~= nil, err.code, tb
        "#,
    );
    assert!(!made);
    assert_eq!(error_code, 7);
    assert!(traceback.starts_with("stack traceback:"), "{traceback}");
    let (ran, unclosed): (i64, i64) = f.eval(
        r#"
        local files = {}
        for name in io.popen("ls " .. marks):lines() do files[name] = true end
        os.execute("rm -r " .. marks)
        local ran, unclosed = 0, 0
        for name in pairs(files) do
          local id = name:match("^a%-(.*)")
          if id then
            ran = ran + 1
            if not files["c-" .. id] then unclosed = unclosed + 1 end
          end
        end
        return ran, unclosed
        "#,
    );
    assert!(ran >= 1, "an init ran");
    assert_eq!(unclosed, 0, "every worker's state was closed before new returned");
}

#[test]
fn an_init_that_does_not_finish_in_time_is_given_up() {
    let f = Fixture::new(None);
    let started = Instant::now();
    let (made, err): (bool, String) = f.eval(
        r#"
        local p, err = new_pool {
          threads = 2,
          init = function() os.execute("sleep 2") end,
          init_timeout = 0.1,
        }
        return p ~= nil, err
        "#,
    );
    let took = started.elapsed();
    assert_eq!((made, err.as_str()), (false, "init timed out"));
    assert!(took < Duration::from_millis(1500), "new waited {took:?}");
}

#[test]
fn an_init_cannot_report_progress() {
    let f = Fixture::new(None);
    let (made, err): (bool, String) = f.eval(
        r#"
        local p, err = new_pool { init = function() require("bgworker.worker").progress(1) end }
        return p ~= nil, err
        "#,
    );
    assert!(!made);
    assert!(err.ends_with("bgworker.worker.progress: not in a job (a pool's init cannot report progress)"), "{err}");
}

/// A 2-thread pool whose init hangs (`sleep 3`) or raises once the file
/// `marker` exists, with a worker retired in a job that ignores its cancel
/// (a call blocked in C), and the marker made before its replacement starts.
const REPLACEMENT: &str = r#"
    marker = os.tmpname() .. ".init"
    local init = load(("local marker, mode = %q, %q\n"):format(marker, MODE) .. [[
      local f = io.open(marker)
      if not f then return end
      f:close()
      if mode == "hang" then os.execute("sleep 3") else error("the replacement's init fails") end
    ]])
    p = new_pool { threads = 2, init = init, init_timeout = 0.3 }
    stuck = submit(p, function() os.execute("sleep 3") end)
"#;

/// Retire the stuck worker and start its replacement, whose init then
/// hangs or raises.
fn replace_stuck_worker(f: &Fixture) {
    f.wait_until("p:status(stuck) == 'running'");
    assert_eq!(f.eval::<String>("return p:cancel(stuck)"), "running");
    f.exec("io.open(marker, 'w'):close()");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(f.eval::<i64>("return p:retire_stuck()"), 1, "the worker stuck in its job is replaced");
}

/// The pool still runs a job, on the thread it has left.
fn assert_still_serves(f: &Fixture) {
    f.exec("quick = submit(p, function() return 'served' end)");
    f.serve_until("outcome(quick)");
    assert!(f.eval::<bool>("os.remove(marker) return outcome(quick)[2] == 'served'"));
}

#[test]
fn a_replacement_whose_init_does_not_return_in_time_is_given_up() {
    let f = Fixture::new(None);
    f.exec(&REPLACEMENT.replace("MODE", "'hang'"));
    replace_stuck_worker(&f);
    assert_eq!(f.eval::<(i64, i64)>("local s = p:stats() return s.threads, s.abandoned"), (2, 1));
    thread::sleep(Duration::from_millis(400));
    // Past init_timeout: given up, cancelled (its `sleep` goes on), never to
    // serve; the pool says it serves with one thread, and both old threads
    // are abandoned.
    assert_eq!(f.eval::<(i64, i64)>("local s = p:stats() return s.threads, s.abandoned"), (1, 2));
    assert_still_serves(&f);
}

#[test]
fn a_replacement_whose_init_raises_is_given_up() {
    let f = Fixture::new(None);
    f.exec(&REPLACEMENT.replace("MODE", "'raise'"));
    replace_stuck_worker(&f);
    // Its thread ends: not abandoned, and the pool serves with one thread.
    f.wait_until("p:stats().threads == 1");
    assert_eq!(f.eval::<i64>("return p:stats().abandoned"), 1, "only the one stuck in its job");
    assert_still_serves(&f);
}
