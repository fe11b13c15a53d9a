//! Closing: runaway jobs, abandoned workers, collection, the state closing.

use std::time::{Duration, Instant};

use super::Fixture;

#[test]
fn close_stops_runaway_jobs_and_cancels_queued_ones() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        for _ = 1, 5 do submit(p, function() while true do end end) end
        "#,
    );
    f.wait_until("p:stats().running == 2");
    assert!(f.eval::<bool>("return p:close(5)"), "every worker stopped and was joined");
    f.exec(
        r#"
        local s = p:stats()
        assert(s.cancelled == 5 and s.threads == 0, "five cancelled")
        assert(p:close(0) == true, "closing again")
        "#,
    );
}

#[test]
fn close_abandons_a_worker_blocked_in_c_after_its_timeout() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        blocked = submit(p, function() os.execute("sleep 1") return "late" end)
        "#,
    );
    f.wait_until("p:status(blocked) == 'running'");
    let started = Instant::now();
    let (all, why): (bool, String) = f.eval("return p:close(0.05)");
    let took = started.elapsed();
    assert_eq!((all, why.as_str()), (false, "timeout"));
    assert!(took < Duration::from_millis(800), "close waited {took:?}, past its timeout and for the blocked job");
    // The abandoned worker wakes up later, finds its job cancelled, and
    // ends on its own; nothing of it reaches this state.
    f.serve_for(Duration::from_millis(1300));
    assert!(f.eval::<bool>("return events[blocked] == nil and p:stats().cancelled == 1"));
}

#[test]
fn a_collected_pool_closes_within_its_grace() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        submit(p, function() os.execute("sleep 3") end)
        "#,
    );
    f.wait_until("p:stats().running == 1");
    let started = Instant::now();
    f.exec("p = nil collectgarbage() collectgarbage()");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "collecting the pool took {took:?}");
}

#[test]
fn closing_the_state_returns_despite_a_runaway_job() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        submit(p, function() os.execute("sleep 3") end)
        submit(p, function() while true do end end)
        "#,
    );
    f.wait_until("p:stats().running == 2");
    let started = Instant::now();
    drop(f);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "closing the state took {took:?}");
}

#[test]
fn an_outcome_nobody_can_receive_counts_as_cancelled() {
    let f = Fixture::new(None);
    f.exec("p = new_pool()");
    assert_eq!(f.h.stop(), 0);
    f.exec("id = submit(p, function() return 1 end)");
    // One snapshot, and the very condition asserted: two `stats()` calls
    // could see the job queued in the first and running in the second.
    f.wait_until("(function() local s = p:stats() return s.running + s.queued == 0 end)()");
    assert!(
        f.eval::<bool>("local s = p:stats() return s.cancelled == 1 and s.done == 0 and p:status(id) == 'finished'")
    );
}

#[test]
fn a_forked_child_neither_uses_nor_waits_for_the_parents_workers() {
    let f = Fixture::new(None);
    f.exec("p = new_pool { threads = 2 }");
    // SAFETY: the child only runs this Lua state and exits with _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // queue answers (the Lua layer raises under its own name); the
            // other methods raise.
            let refused: bool = f.eval(
                r#"
                local id, position, message = submit(p, function() end)
                local ok, err = pcall(p.status, p, 1)
                local fork = "this pool belongs to the process that made it, and this one is a fork of it"
                return id == nil and position == false and message == fork and not ok and err == "status: " .. fork
                "#,
            );
            let started = Instant::now();
            drop(f);
            (refused, started.elapsed() < Duration::from_millis(500))
        }));
        let code = match verdict {
            Ok((true, true)) => 0,
            Ok((false, _)) => 2,
            Ok((true, false)) => 3,
            Err(_) => 4,
        };
        // SAFETY: leaves the child at once, running nothing of the parent's.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    // SAFETY: waits for our own child.
    while unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == 0 {
        assert!(Instant::now() < deadline, "the child did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    let code = libc::WEXITSTATUS(status);
    assert_eq!(code, 0, "2: the child could use the pool; 3: closing it waited for the parent's workers");
    f.exec("id = submit(p, function() return 'parent' end)");
    f.serve_until("outcome(id)");
    assert!(f.eval::<bool>("return p:close(5)"));
}
