//! Progress: order, the bound on events in flight, bad values.

use super::Fixture;
use crate::lua::events::BATCH;

#[test]
fn progress_arrives_in_order_before_the_outcome() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        ids = {}
        for j = 1, 4 do
          ids[j] = submit(p, function(n)
            local worker = require "bgworker.worker"
            for i = 1, n do worker.progress(i, { i }) end
            return "end"
          end, 500)
        end
        "#,
    );
    f.serve_until("outcome(ids[1]) and outcome(ids[2]) and outcome(ids[3]) and outcome(ids[4])");
    f.exec(
        r#"
        for _, id in ipairs(ids) do
          local list = events[id]
          assert(#list == 501, "500 progress events and the outcome")
          for i = 1, 500 do
            assert(list[i][1] == "progress" and list[i][2] == i and list[i][3][1] == i, "in order")
          end
          assert(list[501][1] == "done" and list[501][2] == "end")
        end
        "#,
    );
}

#[test]
fn a_job_that_emits_faster_than_the_loop_drains_waits() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        core = require "bgworker.core"
        p = new_pool()
        id = submit(p, function()
          local worker = require "bgworker.worker"
          for i = 1, 200 do worker.progress(i) end
          return "end"
        end)
        "#,
    );
    // The bound's events wait in the core, in carriers of BATCH: with no
    // bound, all 200 would, in more carriers.
    let bound: usize = f.eval("return native.PROGRESS_IN_FLIGHT");
    let carriers = bound.div_ceil(BATCH) as i64;
    f.wait_until(&format!("core.pending() == {carriers}"));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(f.eval::<(i64, String)>("return core.pending(), p:status(id)"), (carriers, "running".into()));
    f.serve_until("outcome(id)");
    f.exec(
        r#"
        assert(#events[id] == 201)
        for i = 1, 200 do assert(events[id][i][2] == i) end
        "#,
    );
}

#[test]
fn a_value_that_cannot_cross_is_refused_at_the_caller() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool()
        id = submit(p, function()
          local worker = require "bgworker.worker"
          local ok, err = pcall(worker.progress, 1, print)
          worker.progress("after")
          return err
        end)
        "#,
    );
    f.serve_until("outcome(id)");
    let (progress, message): (String, String) = f.eval("return events[id][1][2], outcome(id)[2]");
    assert_eq!(progress, "after");
    assert_eq!(message, "bad argument #2 to 'progress' (a function cannot cross to the Lua thread)");
}
