//! Cancels racing completions, and states that do not wait on each other.

use super::Fixture;

#[test]
fn every_job_ends_exactly_once_when_cancels_race_completions() {
    let f = Fixture::new(None);
    f.exec(
        r#"
        p = new_pool { threads = 2 }
        cancelled, ids = {}, {}
        local seed = 12345
        local function random(n)
          seed = (seed * 1103515245 + 12345) % 2147483648
          return seed % n + 1
        end
        local JOBS = 5000
        for i = 1, JOBS do
          ids[i] = submit(p, function(i) if i % 7 == 0 then error(i) end return i end, i)
          -- Cancel a random job submitted so far: queued, running or ended.
          for _ = 1, 2 do
            local victim = ids[random(i)]
            if p:cancel(victim) then
              assert(not cancelled[victim], "a job is cancelled once")
              cancelled[victim] = true
            end
          end
        end
        function settled()
          local s = p:stats()
          return s.queued + s.running == 0
        end
        "#,
    );
    f.serve_until("settled()");
    f.exec(
        r#"
        local ended, n_cancelled = 0, 0
        for _, id in ipairs(ids) do
          local list = events[id]
          if cancelled[id] then
            n_cancelled = n_cancelled + 1
            assert(list == nil, "a cancelled job has no event")
          else
            assert(list and #list == 1, "one outcome")
            local e = list[1]
            assert((e[1] == "done" and e[2] == id) or (e[1] == "failed" and e[2] == id), "its own outcome")
          end
          ended = ended + 1
        end
        local s = p:stats()
        assert(s.cancelled == n_cancelled and s.done + s.failed + s.cancelled == #ids, "stats agree")
        assert(n_cancelled > 0 and s.done > 0 and s.failed > 0, "the race went every way")
        "#,
    );
}

#[test]
fn a_full_queue_in_one_state_does_not_stall_another_states_pool() {
    let full = Fixture::new(Some(1));
    let other = Fixture::new(None);
    full.exec(
        r#"
        p = new_pool { threads = 2 }
        for i = 1, 40 do submit(p, function(i) return i end, i) end
        "#,
    );
    // Never drained: its workers wait for room in its own queue.
    full.wait_until("require('bgworker.core').pending() == 1");
    other.exec("p = new_pool() id = submit(p, function() return 'answered' end)");
    other.serve_until("outcome(id)");
    assert_eq!(other.eval::<String>("return outcome(id)[2]"), "answered");
    assert!(full.eval::<bool>("return p:close(5)"), "its waiting workers give up when it closes");
}
