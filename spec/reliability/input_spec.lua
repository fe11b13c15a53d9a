-- Bad input: every public Lua function called with wrong types, numbers
-- out of range, nil, huge values and a wrong self gives a Lua error that
-- names the argument (or, where the argument is valid after all, works);
-- never a crash. And garbage datagrams of every size, 0..65507 bytes,
-- never turn into items: the kernel drops them before a connected reader,
-- and an unconnected reader only ever finds an empty queue behind them.

local bgworker = require "bgworker"
local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"
local support = require "support"

local has_copas, copas = pcall(require, "copas")

-- Values to pass where something else is expected: { label, value }.
local VALUES = {
  { "nil", nil }, { "true", true }, { "false", false },
  { "0", 0 }, { "-1", -1 }, { "0.5", 0.5 }, { "1.5", 1.5 }, { "-0.0", -0.0 },
  { "65536", 65536 }, { "2^31", 2 ^ 31 }, { "2^32", 2 ^ 32 }, { "2^53", 2 ^ 53 }, { "2^63", 2 ^ 63 },
  { "2^64", 2 ^ 64 }, { "1e308", 1e308 }, { "huge", math.huge }, { "-huge", -math.huge }, { "nan", 0 / 0 },
  { '""', "" }, { '"x"', "x" }, { '"80"', "80" }, { '"0x50"', "0x50" }, { "a 1 MB string", ("x"):rep(2 ^ 20) },
  { "{}", {} }, { "{1, 2}", { 1, 2 } }, { "a function", print }, { "a coroutine", coroutine.create(function() end) },
  { "a userdata", io.stdout },
}

-- A positive integer, as the Lua layer counts them.
local function is_count(v)
  return type(v) == "number" and v >= 1 and v < math.huge and v == math.floor(v)
end

-- An integer in min..max, or a string that reads as one, as the core takes them.
local function is_integer_in(v, min, max)
  local n = tonumber(v)
  return (type(v) == "number" or type(v) == "string") and n ~= nil and n == math.floor(n) and n >= min and n <= max
end

-- pcall f(...): either it works (valid(...) says it should) or it raises a
-- string that matches one of `names`. Returns ok and the first result.
local function check_call(what, names, valid, f, ...)
  local ok, result = pcall(f, ...)
  if valid then
    assert.is_true(ok, what .. " should work: " .. tostring(result))
  else
    assert.is_false(ok, what .. " should raise")
    assert.is_string(result, what)
    local named = false
    for _, name in ipairs(names) do named = named or result:find(name, 1, true) ~= nil end
    assert.is_true(named, what .. " raised an error that names none of " .. table.concat(names, ", ") .. ": " .. result)
  end
  return ok, result
end

describe("bad input", function()
  local d

  before_each(support.stop_core)

  after_each(function()
    support.finish(d)
    d = nil
    testutil.reset()
  end)

  describe("bgworker.core", function()
    local port

    setup(function()
      local s
      s, port = support.udp_socket()
      s:close()
    end)

    -- check_call for a start function; stop what it started.
    local function check_start(what, names, valid, f, ...)
      if check_call(what, names, valid, f, ...) then core.stop() end
    end

    local function valid_capacity(v)
      return v == nil or is_integer_in(v, 1, 2 ^ 31 - 1)
    end

    it("start(port) and start(port, opts)", function()
      for _, case in ipairs(VALUES) do
        local label, v = case[1], case[2]
        check_start("start(" .. label .. ")", { "#1", "port" }, is_integer_in(v, 1, 65535), core.start, v)
        check_start("start(port, " .. label .. ")", { "#2", "opts" }, v == nil or type(v) == "table", core.start,
          port, v)
        check_start("start(port, {capacity = " .. label .. "})", { "#2", "capacity" }, valid_capacity(v),
          core.start, port, { capacity = v })
      end
      assert.is_false(core.running())
    end)

    it("start_fd(opts) and start_greeting(opts)", function()
      for _, case in ipairs(VALUES) do
        local label, v = case[1], case[2]
        for _, name in ipairs { "start_fd", "start_greeting" } do
          check_start(name .. "(" .. label .. ")", { "#1", "opts" }, v == nil or type(v) == "table", core[name], v)
          check_start(name .. "({capacity = " .. label .. "})", { "#1", "capacity" }, valid_capacity(v), core[name],
            { capacity = v })
        end
        check_start("start_fd({kind = " .. label .. "})", { "#1", "kind" }, v == nil, core.start_fd, { kind = v })
      end
      assert.is_false(core.running())
    end)

    it("functions without arguments ignore extra ones, started or not", function()
      local names = { "greeted", "fd", "stop", "pending", "running", "run", "guard", "sender", "stats", "poll" }
      for _, started in ipairs { false, true } do
        if started then core.start(port) end
        for _, case in ipairs(VALUES) do
          for _, name in ipairs(names) do
            check_call(name .. "(" .. case[1] .. ")", {}, true, core[name], case[2], case[2])
            if not core.running() and started then core.start(port) end
          end
          check_call("wake(" .. case[1] .. ")", { "not started" }, started, core.wake, case[2])
        end
        core.stop()
      end
    end)
  end)

  describe("bgworker", function()
    -- bgworker.new with every value as opts and as each option, also with
    -- loop = "copas" (added to opts where they are a table or nil). Without
    -- Copas, a Copas dispatcher fails even with good options: then for want
    -- of Copas.
    local function new_copas(opts)
      if opts == nil or type(opts) == "table" then
        local o = { loop = "copas" }
        for k, v in pairs(opts or {}) do o[k] = v end
        opts = o
      end
      return bgworker.new(opts)
    end

    local function check_new(fname, f)
      local function expect(what, valid, names, opts)
        if valid and fname == "copas" then
          valid, names = false, { "copas" }
        end
        local ok, result = check_call(fname .. what, names, valid, f, opts)
        if ok then result:stop() end
        assert.is_false(core.running(), fname .. what .. " left the core running")
      end
      for _, case in ipairs(VALUES) do
        local label, v = case[1], case[2]
        expect("(" .. label .. ")", v == nil or type(v) == "table" and next(v) == nil, { "#1" }, v)
        for _, option in ipairs { "capacity", "budget" } do
          -- The Lua layer takes any positive integer. The core refuses
          -- capacities past 2^31 - 1 when it starts, which a Copas
          -- dispatcher does only after it found Copas.
          local valid = v == nil or is_count(v)
          if option == "capacity" and fname == "new" then valid = valid and (v == nil or v < 2 ^ 31) end
          expect("{" .. option .. " = " .. label .. "}", valid, { "opts." .. option, "capacity" }, { [option] = v })
        end
        expect("{errorhandler = " .. label .. "}", v == nil or type(v) == "function", { "opts.errorhandler" },
          { errorhandler = v })
      end
    end

    it("new(opts)", function()
      check_new("new", bgworker.new)
    end)

    it("new{loop = \"copas\", ...}: options are checked before Copas is needed", function()
      local function copas_and_stop(opts)
        local dispatcher = new_copas(opts)
        dispatcher:stop()
        for _ = 1, 5 do copas.step(0) end
        -- check_new stops what it gets: a stopped dispatcher is fine.
        return dispatcher
      end
      if has_copas then
        -- Valid options start a dispatcher in Copas: check_new's "works"
        -- cases are those of new, so test the failures only here.
        for _, case in ipairs(VALUES) do
          local v = case[2]
          if v ~= nil and type(v) ~= "table" then
            check_call("copas(" .. case[1] .. ")", { "#1" }, false, copas_and_stop, v)
          end
          if not is_count(v) and v ~= nil then
            check_call("copas{budget = " .. case[1] .. "}", { "opts.budget" }, false, copas_and_stop, { budget = v })
          end
        end
        check_call("copas{spawn = true}", { "opts.spawn is retired" }, false, copas_and_stop,
          { spawn = true })
      else
        -- Without Copas every call fails: for bad options, naming them.
        check_new("copas", new_copas)
      end
    end)

    it("dispatch(max), wait(timeout) and stop() with bad arguments and a wrong self", function()
      d = bgworker.new()
      for _, case in ipairs(VALUES) do
        local label, v = case[1], case[2]
        check_call("dispatch(" .. label .. ")", { "#1", "max" }, v == nil or is_count(v), d.dispatch, d, v)
        local timeout_ok = type(v) == "number" and v >= 0
        if timeout_ok or v == nil then
          -- A valid timeout, however long, returns once an item is handled.
          support.join(support.produce { items = 1, callback = function() end })
        end
        check_call("wait(" .. label .. ")", { "#1", "timeout" }, timeout_ok or v == nil, d.wait, d, v)
        for _, method in ipairs { "dispatch", "wait", "stop" } do
          check_call(method .. " with self " .. label, { "on bad self", "dispatcher expected" }, false, d[method], v)
        end
      end
      assert.is_true(core.running())
      assert.equal(0, d:stop())
      -- A stopped dispatcher does nothing, whatever it is given.
      for _, case in ipairs(VALUES) do
        assert.equal(0, d:stop(case[2]))
      end
      assert.equal(0, d:dispatch())
      assert.equal(0, d:wait(0))
    end)
  end)
end)

describe("garbage datagrams", function()
  -- Every size a UDP datagram over IPv4 can have, or a sample of them in
  -- the small (valgrind) run.
  local MAX = 65507
  local STEP = support.size(1, 997)
  local garbage

  setup(function()
    local bytes = {}
    math.randomseed(4)
    for i = 1, MAX do bytes[i] = string.char(math.random(0, 255)) end
    garbage = table.concat(bytes)
  end)

  after_each(function()
    support.finish()
    testutil.reset()
  end)

  local function sizes()
    local size = -STEP
    return function()
      if size >= MAX then return nil end
      size = math.min(size + STEP, MAX)
      return size
    end
  end

  it("from other sockets never reach a dispatcher's connected socket", function()
    local d = bgworker.new()
    local _, port = d.socket:getsockname()
    local before = core.stats()
    local from_other_port = support.udp_socket("127.0.0.1")
    -- The sender's own port, from another loopback address.
    local _, sender_port = core.sender()
    local from_other_address = assert(socket.udp())
    assert(from_other_address:setsockname("127.0.0.2", sender_port))
    for size in sizes() do
      assert(from_other_port:sendto(garbage:sub(1, size), "127.0.0.1", port))
      if size % 4096 == 0 then
        assert(from_other_address:sendto(garbage:sub(1, size), "127.0.0.1", port))
      end
    end
    from_other_port:close()
    from_other_address:close()
    assert.same({}, socket.select({ d.socket }, nil, 0.1), "a garbage datagram arrived")
    assert.equal(0, d:dispatch())
    local delta = support.stats_delta(before)
    assert.equal(0, delta.polled + delta.errors)
    -- The socket still works.
    local got = 0
    support.join(support.produce { items = 3, callback = function() got = got + 1 end })
    assert.is_true(support.pump(d, function() return got == 3 end))
    d:stop()
  end)

  it("wake an unconnected reader, which then finds only an empty queue", function()
    local reader, port = support.start_core(nil, false)
    local before = core.stats()
    local sender = support.udp_socket("127.0.0.1")
    local received, sent, polls = 0, 0, 0
    local function read_and_poll()
      received = received + support.discard(reader)
      polls = polls + 1
      assert.equal(0, select("#", core.poll()), "garbage became an item")
    end
    for size in sizes() do
      assert(sender:sendto(garbage:sub(1, size), "127.0.0.1", port))
      sent = sent + 1
      -- Read before the socket's buffer overflows.
      if sent % 16 == 0 then read_and_poll() end
    end
    socket.select({ reader }, nil, 0.1)
    read_and_poll()
    sender:close()
    assert.is_true(received > 0, "no garbage arrived: the test tested nothing")
    local delta = support.stats_delta(before)
    assert.equal(polls, delta.empty_polls)
    assert.equal(0, delta.polled + delta.errors)
    -- Items still come through the garbage-worn reader.
    local got = 0
    support.join(support.produce { items = 3, callback = function() got = got + 1 end })
    assert.equal(3, support.drain())
    assert.equal(3, got)
    core.stop()
    reader:close()
  end)
end)
