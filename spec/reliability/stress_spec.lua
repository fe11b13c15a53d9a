-- Stress: 8 producers x 250000 items of random payload sizes through the
-- dispatcher, into an unbounded queue and into a bounded one (capacity
-- 1024, producers blocking for room). Every item arrives exactly once, in
-- order per producer, with its payload's checksum intact, and every item is
-- freed once. core_spec.lua does the same at 4 x 100000 on an unbounded
-- queue read by hand; this adds the bounded queue, more producers than
-- cores, and the dispatcher's budget and self-wake under load.

local bgworker = require "bgworker"
local core = require "bgworker.core"
local testutil = require "bgworker_testutil"
local support = require "support"

local PRODUCERS = 8
local ITEMS = support.size(250000, 2500)
local PAYLOAD = 200 -- each item carries 0..200 random bytes

describe("stress", function()
  local d

  before_each(support.reset)

  after_each(function()
    support.finish(d)
    d = nil
    testutil.reset()
  end)

  for _, case in ipairs {
    { name = "an unbounded queue" },
    { name = "a bounded queue (capacity 1024, blocking deliver)", capacity = 1024 },
  } do
    it(("delivers %d x %d items exactly once and in order into %s"):format(PRODUCERS, ITEMS, case.name), function()
      local total = PRODUCERS * ITEMS
      local errors = {}
      d = bgworker.new { capacity = case.capacity, errorhandler = function(err) errors[#errors + 1] = err end }
      local before = core.stats()
      local next_seq, received, bad = {}, 0, nil
      for p = 1, PRODUCERS do next_seq[p] = 1 end
      local job = support.produce {
        producers = PRODUCERS, items = ITEMS, payload = PAYLOAD, timeout = testutil.FOREVER,
        callback = function(p, seq, ok)
          if seq ~= next_seq[p] or not ok then
            bad = bad or ("producer %d: seq %d (checksum ok: %s), expected seq %d"):format(p, seq, tostring(ok),
              next_seq[p])
          end
          next_seq[p] = seq + 1
          received = received + 1
        end,
      }
      assert.is_true(support.pump(d, function() return received >= total end), "items stranded at " .. received)
      assert.same(support.codes { BGW_OK = total }, support.join(job))
      assert.is_nil(bad)
      assert.same({}, errors)
      assert.equal(total, received)
      for p = 1, PRODUCERS do assert.equal(ITEMS + 1, next_seq[p]) end
      assert.equal(0, d:dispatch(), "an item after the last")
      assert.equal(0, core.pending())
      local delta = support.stats_delta(before)
      assert.equal(total, delta.delivered)
      assert.equal(total, delta.polled)
      assert.equal(0, delta.rejected + delta.cancelled + delta.errors + delta.wake_errors)
      local c = testutil.counters()
      assert.equal(total, c.allocated)
      assert.equal(total, c.decodes)
      support.assert_all_freed()
    end)
  end
end)
