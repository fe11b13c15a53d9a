-- A Copas server that runs a command per request and streams its output:
-- each line reaches the client as soon as the command writes it, and the
-- server goes on serving other clients meanwhile. Clients name a command;
-- the server runs only the commands it knows, each as an argv (no shell:
-- nothing a client sends becomes a command line). Three clients ask at
-- once, then the server closes, and copas.loop() returns.
--
--     lua examples/process.lua      (Copas 4)

local copas = require "copas"
local socket = require "socket"
local bgworker = require "bgworker"
local process = require "bgworker.process"

bgworker.new { loop = "copas" }

local COMMANDS = {
  count = { "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done" },
  hello = { "echo", "hello from a child process" },
  fail = { "sh", "-c", "echo 'about to fail' >&2; exit 3" },
}

local server = assert(socket.bind("127.0.0.1", 0))
local _, port = server:getsockname()

copas.addserver(server, function(raw)
  local client = copas.wrap(raw)
  local argv = COMMANDS[client:receive("*l")]
  if not argv then
    client:send("unknown command\n")
    return
  end
  local p = process.spawn(argv)
  while true do
    local line = p:read_line(5) -- suspends this handler only
    if not line then break end
    client:send("out " .. line .. "\n")
  end
  local ok, how, code = p:wait(5)
  local err = p.stderr:read(5)
  if err then
    client:send("err " .. err)
  end
  client:send(("end %s %s %s\n"):format(tostring(ok), how, code))
end)

local clients = 0
local function ask(name)
  clients = clients + 1
  copas.addthread(function()
    local sock = copas.wrap(socket.tcp())
    assert(sock:connect("127.0.0.1", port))
    sock:send(name .. "\n")
    local started, times = socket.gettime(), {}
    while true do
      local line = sock:receive("*l")
      if not line then break end
      times[#times + 1] = socket.gettime() - started
      print(name .. ": " .. line)
    end
    sock:close()
    if name == "count" then
      -- Streamed: the first line came well before the last.
      print(("count: streamed: %s"):format(tostring(times[3] - times[1] > 0.3)))
    end
    clients = clients - 1
    if clients == 0 then
      copas.removeserver(server)
    end
  end)
end

ask("count")
ask("hello")
ask("fail")
copas.loop() -- returns once the clients are served and the server is closed
