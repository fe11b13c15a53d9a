--- A spec for a small Copas 4 TCP server whose handler uses a bgworker
-- pool, tested end to end with bgworker.busted. Each line a client sends is
-- a number; the server squares it on a worker thread and answers. Run it
-- with plain busted (bgworker and Copas 4 on the Lua paths):
--
--     busted examples/server_spec.lua

local helper = require "bgworker.busted"
local copas = require "copas"
local pool = require "bgworker.pool"
local socket = require "socket"

local async, eventually = helper.async, helper.eventually

-- The server under test, on a free port: the port. Each connection has a
-- handler of its own, which a job's `get` suspends alone.
local function serve(workers)
  local server = assert(socket.bind("127.0.0.1", 0))
  copas.addserver(server, function(raw)
    local client = copas.wrap(raw)
    while true do
      local line = client:receive("*l")
      if not line then
        return
      end
      local ok, square = workers:submit(function(n) return n * n end, tonumber(line)):get(5)
      client:send((ok and tostring(square) or "error: " .. tostring(square)) .. "\n")
    end
  end)
  return select(2, server:getsockname())
end

-- A client of the server at `port`: the answer to each of `lines`.
local function ask(port, lines)
  local client = copas.wrap(socket.tcp())
  assert(client:connect("127.0.0.1", port))
  local answers = {}
  for i, line in ipairs(lines) do
    client:send(line .. "\n")
    answers[i] = client:receive("*l")
  end
  client:close()
  return answers
end

describe("the squares server", function()
  it("answers each line with its square, worked out on a worker", async(function()
    local port = serve(pool.new { threads = 2 })
    assert.same({ "9", "144", "1600" }, ask(port, { 3, 12, 40 }))
  end, { loop = "copas", timeout = 5 }))

  it("serves several clients at once", async(function()
    local port = serve(pool.new { threads = 2 })
    local answered = 0
    for i = 1, 5 do
      -- An error in this thread (a failed assert) fails the test.
      copas.addthread(function()
        assert.same({ tostring(i * i) }, ask(port, { i }))
        answered = answered + 1
      end)
    end
    eventually(function() return answered == 5 end, 5)
  end, { loop = "copas", timeout = 5 }))

  it("says what went wrong in a job", async(function()
    local port = serve(pool.new { threads = 1 })
    assert.matches("^error: .*attempt to perform arithmetic", ask(port, { "not a number" })[1])
  end, { loop = "copas", timeout = 5 }))
end)
