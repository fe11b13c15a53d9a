-- Messages to a running job: `job:send(...)` on this thread, and in the
-- job `require("bgworker.worker").receive([timeout])`. In order, exactly
-- once, bounded (`MESSAGES_QUEUED`), copied as arguments are; `send` to a
-- job that ended says so; a job blocked in `receive` is a cancellation
-- point, so its worker is back at once.

local bgworker = require "bgworker"
local pool = require "bgworker.pool"
local socket = require "socket"

describe("job:send and bgworker.worker.receive", function()
  local d, workers

  before_each(function()
    d = bgworker.new()
    workers = pool.new { threads = 1 }
  end)

  after_each(function()
    workers:close(0)
    d:stop()
  end)

  -- A job that receives until "end" and returns what it got, in order.
  local function collector()
    return workers:submit(function()
      local receive = require("bgworker.worker").receive
      local got = {}
      while true do
        local v = receive(10)
        if v == "end" or v == nil then
          return got, v
        end
        got[#got + 1] = v
      end
    end)
  end

  it("hands a running job its messages in the order sent, each once", function()
    local job = collector()
    local sent = 0
    -- More than MESSAGES_QUEUED: a full queue is waited out here.
    while sent < 1000 do
      local ok, why = job:send(sent + 1)
      if ok then
        sent = sent + 1
      else
        assert.equals("full", why)
        socket.sleep(0.001)
      end
    end
    while not job:send("end") do socket.sleep(0.001) end
    local ok, got, last = job:get(10)
    assert.is_true(ok)
    assert.equals("end", last)
    assert.equals(1000, #got)
    for i = 1, 1000 do
      assert(got[i] == i, "message " .. i .. " came as " .. tostring(got[i]))
    end
  end)

  it("keeps the messages of a queued job until it starts", function()
    local gate = collector() -- holds the pool's one worker
    local job = collector()
    assert.equals("queued", job:status())
    assert.is_true(job:send("a"))
    assert.is_true(job:send("b", "ignored"))
    assert.is_true(job:send("end"))
    assert.is_true(gate:send("end"))
    assert.same({ true, {}, "end" }, { gate:get(10) })
    assert.same({ true, { "a", "b" }, "end" }, { job:get(10) })
  end)

  it("copies the values: a table changed in the job is not changed here", function()
    local job = workers:submit(function()
      local receive = require("bgworker.worker").receive
      local t, n = receive(10)
      t.inner.x = "changed"
      return t, n, select("#", receive(10))
    end)
    local t = { inner = { x = "kept" }, list = { 1, 2, 3 } }
    assert.is_true(job:send(t, 42))
    assert.is_true(job:send())
    local ok, back, n, count = job:get(10)
    assert.is_true(ok)
    assert.equals("kept", t.inner.x)
    assert.same({ inner = { x = "changed" }, list = { 1, 2, 3 } }, back)
    assert.equals(42, n)
    assert.equals(0, count, "a message of no values receives none")
  end)

  it("refuses a value that cannot be copied, at the caller's line, naming it", function()
    local job = collector()
    local ok, err = pcall(function() job:send(1, print) end)
    assert.is_false(ok)
    assert.matches("pool_messages_spec.lua:%d+: bad argument #2 to 'send' %(a function cannot be copied to a worker%)",
      err)
    ok, err = pcall(function() job:send(io.stdout) end)
    assert.is_false(ok)
    assert.matches("pool_messages_spec.lua:%d+: bad argument #1 to 'send'", err)
    ok, err = pcall(function() job.send({}, 1) end)
    assert.is_false(ok)
    assert.matches("job expected", err)
    assert.is_true(job:send("end"))
    assert.same({ true, {}, "end" }, { job:get(10) })
  end)

  it("refuses more than MESSAGES_QUEUED waiting messages, without waiting", function()
    assert.equals(64, pool.MESSAGES_QUEUED)
    local job = workers:submit(function()
      require("socket").sleep(0.3)
      local receive, n = require("bgworker.worker").receive, 0
      while receive(0) ~= nil do n = n + 1 end
      return n
    end)
    for i = 1, pool.MESSAGES_QUEUED do
      assert(job:send(i), "message " .. i)
    end
    assert.same({ false, "full" }, { job:send("one too many") })
    assert.same({ true, pool.MESSAGES_QUEUED }, { job:get(10) })
  end)

  it("says \"ended\" for a job that returned, failed or was cancelled, and on a closed pool", function()
    local done = workers:submit(function() return 1 end)
    assert.same({ true, 1 }, { done:get(10) })
    assert.same({ false, "ended" }, { done:send(1) })
    local failed = workers:submit(function() error("no") end)
    assert.is_false((failed:get(10)))
    assert.same({ false, "ended" }, { failed:send(1) })
    local cancelled = collector()
    assert.is_true(cancelled:cancel())
    assert.same({ false, "ended" }, { cancelled:send(1) })
    local queued = collector()
    workers:close(0)
    assert.same({ false, "ended" }, { queued:send(1) })
  end)

  it("times out in receive with nil, \"timeout\", and checks its timeout", function()
    local job = workers:submit(function()
      local receive = require("bgworker.worker").receive
      local a, b = receive(0.05)
      local ok, err = pcall(receive, -1)
      local ok2, err2 = pcall(receive, "1")
      return a, b, ok, err, ok2, err2
    end)
    local ok, a, b, ok1, err1, ok2, err2 = job:get(10)
    assert.is_true(ok)
    assert.is_nil(a)
    assert.equals("timeout", b)
    assert.is_false(ok1)
    assert.matches("bad argument #1 to 'receive' %(timeout must be a non%-negative number of seconds, got %-1%)",
      err1)
    assert.is_false(ok2)
    assert.matches("got 1%)", err2)
  end)

  it("raises in a pool's init, which receives no messages", function()
    local ok, err = pcall(pool.new, { threads = 1, init = function() require("bgworker.worker").receive(0) end })
    assert.is_false(ok)
    assert.matches("init failed in a worker: [^\n]*receive: not in a job %(a pool's init receives no messages%)", err)
  end)

  it("ends a job that waits in receive at its cancel, and its worker takes the next job", function()
    local job = workers:submit(function()
      return require("bgworker.worker").receive()
    end)
    local deadline = socket.gettime() + 10
    while workers:stats().running == 0 and socket.gettime() < deadline do socket.sleep(0.01) end
    assert.is_true(job:cancel())
    assert.same({ false, "cancelled" }, { job:get(0) })
    assert.same({ true, "next" }, { workers:submit(function() return "next" end):get(10) })
    -- Back from receive, not retired and replaced after the grace.
    local stats = workers:stats()
    assert.equals(0, stats.abandoned)
    assert.equals(1, stats.threads)
  end)
end)
