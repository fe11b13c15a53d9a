-- bgworker.dns: getaddrinfo on worker threads, answers through a real
-- dispatcher. Only names this machine answers for without a network:
-- localhost, its own host name (when LuaSocket's toip resolves it, so
-- /etc/hosts has it), numeric IPv4 and IPv6 addresses, and an invalid name.
-- That one is malformed (an empty label), so the C library refuses it
-- before asking any server: a well-formed unknown name such as
-- "nonexistent.invalid" would go to DNS, and be slow or fail otherwise
-- without a network. A resolver that never answers is
-- spec/native/stalldns.c, preloaded into a child interpreter.
--
-- toip waits wherever bgworker.await can: here outside any coroutine with a
-- select dispatcher, and in Copas threads. The Copas specs follow
-- spec/copas_spec.lua: against Copas 4 on every Lua version, and against
-- Debian's Copas 1.x on 5.1, 5.2 and LuaJIT.

local bgworker = require "bgworker"
local dns = require "bgworker.dns"
local socket = require "socket"
local support = require "support"

local INVALID = "nonexistent..invalid"

local function pack(...)
  return { n = select("#", ...), ... }
end

-- What LuaSocket's blocking toip says, for comparison.
local function luasocket_toip(host)
  return socket.dns.toip(host)
end

setup(support.stop_core)

describe("bgworker.dns", function()
  local d

  before_each(function()
    d = bgworker.new()
  end)

  after_each(function()
    d:stop()
  end)

  -- Resolve with dns.resolve, waiting through the dispatcher.
  local function resolve(host)
    local got
    dns.resolve(host, function(...) got = pack(...) end)
    while not got do
      assert(d:wait(5) > 0, "no answer within 5 s")
    end
    return got
  end

  it("resolves localhost to the IPv4 loopback, first", function()
    local got = resolve("localhost")
    assert.equals(2, got.n)
    assert.equals("127.0.0.1", got[1][1])
    assert.equals("localhost", got[2])
  end)

  it("resolves numeric IPv4 and IPv6 addresses to themselves", function()
    assert.same({ n = 2, { "127.0.0.1" }, "127.0.0.1" }, resolve("127.0.0.1"))
    assert.same({ n = 2, { "::1" }, "::1" }, resolve("::1"))
  end)

  it("reports a name that does not resolve as LuaSocket does", function()
    local _, expected = luasocket_toip(INVALID)
    assert.equals("host not found", expected)
    assert.same({ n = 2, nil, expected }, resolve(INVALID))
  end)

  it("answers every one of many concurrent lookups once", function()
    -- More than the worker threads at once: the rest queue.
    local hosts = { "localhost", "127.0.0.1", "::1", INVALID }
    local answers, count = {}, 0
    for i = 1, 100 do
      local host = hosts[i % #hosts + 1]
      dns.resolve(host, function(addresses, name)
        assert.is_nil(answers[i], "answered twice")
        answers[i] = { host = host, first = addresses and addresses[1], name = name }
        count = count + 1
      end)
    end
    while count < 100 do
      assert(d:wait(5) > 0, "answers stopped coming after " .. count)
    end
    for i = 1, 100 do
      local a = answers[i]
      if a.host == INVALID then
        assert.same({ host = INVALID, name = "host not found" }, a)
      elseif a.host == "::1" then
        assert.equals("::1", a.first)
      else
        assert.equals("127.0.0.1", a.first)
      end
    end
  end)

  describe("toip outside a coroutine, waiting through the dispatcher", function()
    it("matches LuaSocket's toip for localhost", function()
      local ip, resolved = dns.toip("localhost")
      local lip, lresolved = luasocket_toip("localhost")
      assert.equals(lip, ip)
      assert.equals(lresolved.name, resolved.name)
      assert.same({}, resolved.alias)
      assert.equals(ip, resolved.ip[1])
      for _, address in ipairs(lresolved.ip) do
        assert.truthy(resolved.ip[address] == nil) -- a list, not a set
        local found = false
        for _, mine in ipairs(resolved.ip) do found = found or mine == address end
        assert.is_true(found, address .. " missing")
      end
    end)

    it("resolves this machine's host name as LuaSocket does", function()
      local hostname = socket.dns.gethostname()
      local lip = luasocket_toip(hostname)
      assert.is_string(lip, "LuaSocket cannot resolve " .. hostname .. " here")
      local ip, resolved = dns.toip(hostname)
      assert.equals(lip, ip)
      assert.is_string(resolved.name)
    end)

    it("returns an IPv6 address and the address itself as the name", function()
      assert.same({ n = 2, "::1", { name = "::1", alias = {}, ip = { "::1" } } }, pack(dns.toip("::1")))
      assert.same({ n = 2, "127.0.0.1", { name = "127.0.0.1", alias = {}, ip = { "127.0.0.1" } } },
        pack(dns.toip("127.0.0.1")))
    end)

    it("returns nil and LuaSocket's message for a name that does not resolve", function()
      assert.same(pack(luasocket_toip(INVALID)), pack(dns.toip(INVALID)))
    end)

    it("gives up after the timeout with nil, \"timeout\"", function()
      assert.same({ n = 2, nil, "timeout" }, pack(dns.toip("localhost", 0)))
    end)
  end)

  it("calls resolve's callback once with nil, \"timeout\" when the time is up first", function()
    local got = {}
    dns.resolve("localhost", function(...) got[#got + 1] = pack(...) end, 0.05)
    -- The answer is queued by now, the timer due: the timeout wins, and the
    -- answer that comes after it is dropped.
    socket.sleep(0.2)
    while d:wait(0.2) > 0 do end
    assert.same({ { n = 2, nil, "timeout" } }, got)
  end)

  describe("arguments", function()
    it("are checked, naming the argument", function()
      assert.has_error(function() dns.toip() end, "bad argument #1 to 'toip' (host must be a string, got nil)")
      assert.has_error(function() dns.toip(42) end, "bad argument #1 to 'toip' (host must be a string, got 42)")
      assert.has_error(function() dns.toip("local\0host") end,
        "bad argument #1 to 'toip' (host name contains a NUL byte)")
      assert.has_error(function() dns.toip("localhost", -1) end,
        "bad argument #2 to 'toip' (timeout must be a non-negative number of seconds, got -1)")
      assert.has_error(function() dns.resolve({}, print) end,
        "bad argument #1 to 'resolve' (host must be a string, got table)")
      assert.has_error(function() dns.resolve("localhost") end,
        "bad argument #2 to 'resolve' (callback must be a function, got nil)")
      assert.has_error(function() dns.resolve("localhost", print, "1") end,
        'bad argument #3 to \'resolve\' (timeout must be a non-negative number of seconds, got "1")')
    end)

    it("need a running dispatcher", function()
      d:stop()
      local ok, err = pcall(dns.resolve, "localhost", print)
      assert.is_false(ok)
      assert.matches("no bgworker dispatcher is running", err, 1, true)
    end)
  end)

  describe("when the answer has nowhere to go", function()
    it("drops it if the dispatcher stopped, and the next dispatcher works", function()
      local called = false
      for _ = 1, 20 do
        dns.resolve("localhost", function() called = true end)
      end
      d:stop()
      socket.sleep(0.1) -- the lookups finish and find the dispatcher stopped
      d = bgworker.new()
      assert.is_false(called)
      assert.equals("127.0.0.1", (dns.toip("localhost")))
      assert.is_false(called)
    end)

    it("survives the Lua state closing with lookups in flight", function()
      -- In a child process, the only state with bgworker.dns closes while
      -- its lookups run: the worker threads' deliveries are refused
      -- (BGW_CLOSED), their answers dropped there, and the process lives on.
      local _, text = support.run_lua [[
        local testutil = require "bgworker_testutil"
        local ok, err = testutil.fresh_state([=[
          local bgworker = require "bgworker"
          local dns = require "bgworker.dns"
          local d = bgworker.new() -- referenced: a collected dispatcher stops
          for i = 1, 50 do
            dns.resolve(i % 2 == 0 and "localhost" or "::1", function() end)
          end
        ]=])
        assert(ok, err)
        require("socket").sleep(0.2)
        io.write("alive")
      ]]
      assert.equals("alive", text)
    end)
  end)
end)

describe("bgworker.dns against a resolver that never answers", function()
  -- In a child interpreter with bgworker_stalldns preloaded: there a name
  -- ending in ".stall.test" blocks getaddrinfo for `stall` seconds, then
  -- fails (spec/native/stalldns.c), as a resolver whose server never
  -- replies does. The lookups go through everything real: dns.lua, the
  -- tokens, the module's threads and their bounds, the getaddrinfo call.
  -- The child prints "ok" or what went wrong.
  local function with_stalled_resolver(stall, script)
    local build = assert(os.getenv("BGWORKER_BUILD"), "BGWORKER_BUILD names the build (set by make specs-*)")
    local preload = build .. "/bgworker_stalldns.so"
    assert(io.open(preload), preload .. " missing: make build-<version> builds it"):close()
    local _, text = support.run_lua([[
      local bgworker = require "bgworker"
      local dns = require "bgworker.dns"
      local socket = require "socket"
      local d = bgworker.new()
      -- Run the dispatcher until cond() holds; false after `seconds`.
      local function wait_until(cond, seconds)
        local deadline = socket.gettime() + seconds
        while not cond() do
          local left = deadline - socket.gettime()
          if left <= 0 then return false end
          d:wait(left)
        end
        return true
      end
    ]] .. script .. [[
      io.write("ok")
    ]], 60, ("env LD_PRELOAD=\"%s%s\" BGWORKER_STALL_SECONDS=%s"):format(
      preload:sub(1, 1) == "/" and "" or "$PWD/", preload, stall))
    return text
  end

  it("lets a lookup through after 20 that were given up on", function()
    -- The issue's case, with shorter timeouts: the 20 lookups given up on
    -- are all still in getaddrinfo when localhost is looked up.
    assert.equals("ok", with_stalled_resolver(10, [[
      for i = 1, 20 do
        local ip, err = dns.toip(i .. ".stall.test", 0.05)
        assert(ip == nil and err == "timeout", "lookup " .. i .. ": " .. tostring(ip) .. ", " .. tostring(err))
      end
      local ip, err = dns.toip("localhost", 2)
      assert(ip == "127.0.0.1", "localhost after 20 lookups given up on: " .. tostring(ip) .. ", " .. tostring(err))
    ]]))
  end)

  it("starts a waiting lookup once those ahead of it are given up on", function()
    -- 20 lookups, more than may run at once: the localhost lookup waits
    -- behind them, until they time out (resolve's timer, then toip's own
    -- wait in coroutines). Each stalled lookup calls back once, with
    -- "timeout", and nothing comes after their getaddrinfo returned.
    assert.equals("ok", with_stalled_resolver(3, [[
      local function threads()
        for line in io.lines("/proc/self/status") do
          local n = line:match("^Threads:%s*(%d+)")
          if n then return tonumber(n) end
        end
      end
      -- Counted once a timer rang: the core's alarm thread then runs.
      local rang
      d:timer(0.01, function() rang = true end)
      assert(wait_until(function() return rang end, 5), "the timer did not ring")
      local base = threads()
      local calls = {}
      for i = 1, 20 do
        calls[i] = {}
        dns.resolve(i .. ".stall.test", function(_, err) table.insert(calls[i], err) end, 0.2)
      end
      local got
      dns.resolve("localhost", function(addresses, err) got = { addresses, err } end, 1.5)
      assert(wait_until(function() return got end, 5), "no answer for localhost")
      assert(got[1], "localhost behind 20 resolve lookups given up on: " .. tostring(got[2]))

      got = nil
      for i = 1, 20 do
        coroutine.wrap(function() dns.toip(i .. ".stall.test", 0.2) end)()
      end
      coroutine.wrap(function() got = { dns.toip("localhost", 1.5) } end)()
      assert(wait_until(function() return got end, 5), "no answer for localhost")
      assert(got[1] == "127.0.0.1", "localhost behind 20 toip lookups given up on: " .. tostring(got[2]))

      -- The stalled lookups end by themselves, and none calls back again.
      assert(wait_until(function() return threads() <= base end, 10), "lookup threads left: " .. threads() - base)
      wait_until(function() return false end, 0.2)
      for i = 1, 20 do
        assert(#calls[i] == 1 and calls[i][1] == "timeout", "lookup " .. i .. " called back: " ..
          table.concat(calls[i], ", "))
      end
    ]]))
  end)
end)

-- Each test is a Copas thread of bgworker.busted's, with a Copas
-- dispatcher of its own.
describe("bgworker.dns in Copas", function()
  local copas = support.needs_copas()
  if not copas then return end
  local helper = require "bgworker.busted"
  local eventually = helper.eventually

  local function in_copas(body, timeout)
    return helper.async(body, { loop = "copas", timeout = timeout })
  end

  it("toip matches LuaSocket's toip, also for a name that does not resolve", in_copas(function()
    -- Each lookup in a Copas thread of its own, all at once.
    local results = {}
    for _, host in ipairs { "localhost", "127.0.0.1", INVALID } do
      copas.addthread(function()
        results[host] = pack(dns.toip(host))
      end)
    end
    eventually(function() return results.localhost and results["127.0.0.1"] and results[INVALID] end, 10)
    local ip, resolved = results.localhost[1], results.localhost[2]
    assert.equals((luasocket_toip("localhost")), ip)
    assert.same({ name = "localhost", alias = {}, ip = resolved.ip }, resolved)
    assert.equals("127.0.0.1", results["127.0.0.1"][1])
    assert.same(pack(luasocket_toip(INVALID)), results[INVALID])
  end, 15))

  it("toip returns IPv6 answers", in_copas(function()
    assert.same({ n = 2, "::1", { name = "::1", alias = {}, ip = { "::1" } } }, pack(dns.toip("::1")))
  end))

  it("toip suspends only its own thread: another thread keeps running", in_copas(function()
    local answer, ticks_at_answer
    -- A thread that ticks once a loop step, until the answer came.
    local ticker = support.copas_ticker(function() return answer ~= nil end)
    answer = pack(dns.toip("localhost"))
    ticks_at_answer = ticker.ticks
    assert.equals("127.0.0.1", answer[1])
    -- The answer comes through the dispatcher's socket, then the waiting
    -- thread's: at least one loop step in which the ticker ran.
    assert.is_true(ticks_at_answer >= 1, "ticks before the answer: " .. tostring(ticks_at_answer))
  end))
end)
