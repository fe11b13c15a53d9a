-- A real nginx for the tests: the shell and file helpers, and one nginx
-- master started from a configuration, asked over HTTP, and stopped
-- whatever state it is in. Used by spec/nginx/nginx_test.lua and by the
-- OpenResty example's test (spec/examples_test.lua).
--
--     local harness = require "spec.nginx.harness"
--     local server = harness.new()           -- a temporary directory, a free port
--     server:write_config(text)              -- DIR/nginx.conf
--     server:start()                         -- raises, with the log, if it does not serve
--     local code, body = server:get("/path")
--     server:quit()
--     server:cleanup()                       -- kills what is left, removes the directory
--
-- Found as "spec.nginx.harness" from the top of the checkout (LuaJIT or Lua
-- 5.1 with LuaSocket). Environment: NGINX (the binary, default
-- /usr/sbin/nginx), NGINX_MODULES (the directory of ndk_http_module.so and
-- ngx_http_lua_module.so, default /usr/lib/nginx/modules), BGWORKER_KEEP=1 to
-- keep the temporary directory.

local http = require "socket.http"
local socket = require "socket"

local harness = {}

harness.NGINX = os.getenv("NGINX") or "/usr/sbin/nginx"
harness.MODULES = os.getenv("NGINX_MODULES") or "/usr/lib/nginx/modules"

-- Every wait has a deadline: a test fails rather than hangs.
harness.START_TIMEOUT, harness.EXIT_TIMEOUT, harness.REQUEST_TIMEOUT = 10, 15, 20
http.TIMEOUT = harness.REQUEST_TIMEOUT

-- Lines of an error log that mean a crash or a fatal condition.
harness.CRASH_MARKS = { "exited on signal", "core dumped", "[alert]", "[emerg]", "[crit]" }

--------------------------------------------------------------------------
-- Shell and files

function harness.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Run a command; true when it exits with status 0 (Lua 5.1 and 5.2+ alike).
function harness.execute(cmd)
  local a, _, c = os.execute(cmd)
  if type(a) == "number" then
    return a == 0
  end
  return a == true and c == 0
end

function harness.capture(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

function harness.read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local s = f:read("*a")
  f:close()
  return s
end

function harness.write_file(path, s)
  local f = assert(io.open(path, "wb"))
  assert(f:write(s))
  f:close()
end

function harness.exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
  end
  return f ~= nil
end

function harness.alive(pid)
  return pid ~= nil and harness.execute("kill -0 " .. pid .. " 2>/dev/null")
end

--- Wait until `check()` is true, for at most `timeout` seconds.
function harness.wait_until(timeout, check)
  local deadline = socket.gettime() + timeout
  repeat
    if check() then
      return true
    end
    socket.sleep(0.05)
  until socket.gettime() > deadline
  return check()
end

function harness.free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, p = s:getsockname()
  s:close()
  return tonumber(p)
end

--- Raise unless nginx, its Lua module, curl and the LuaJIT build in `build`
-- (with the files named in `libraries`, relative to it) are there.
function harness.check_requirements(build, libraries)
  assert(harness.exists(harness.NGINX), "nginx not found at " .. harness.NGINX .. " (set NGINX)")
  for _, m in ipairs({ "ndk_http_module.so", "ngx_http_lua_module.so" }) do
    assert(harness.exists(harness.MODULES .. "/" .. m), harness.MODULES .. "/" .. m ..
      " not found: install libnginx-mod-http-lua (or set NGINX_MODULES)")
  end
  for _, lib in ipairs(libraries) do
    assert(harness.exists(build .. "/" .. lib), "no " .. lib .. " in " .. build .. ": run make build-jit")
  end
  assert(harness.execute("curl --version >/dev/null 2>&1"), "curl not found")
end

--------------------------------------------------------------------------
-- One nginx

local Server = {}
Server.__index = Server

--- A server to be: a new temporary directory (`dir`, for the configuration,
-- pid file, logs and temp paths) and a free port on 127.0.0.1 (`port`).
-- `prefix` (default: `dir`) is nginx's -p.
function harness.new(prefix)
  local dir = harness.capture("mktemp -d \"${TMPDIR:-/tmp}/bgworker-nginx.XXXXXX\""):gsub("%s+$", "")
  assert(dir ~= "", "mktemp failed")
  return setmetatable({ dir = dir, prefix = prefix or dir, port = harness.free_port() }, Server)
end

--- "user root;" when running as root (nginx would run its workers as
-- "nobody", who may not read the checkout), else "".
function harness.user_directive()
  return harness.capture("id -u"):match("^0%s") and "user root;" or ""
end

--- The http-level directives that put nginx's temp paths in DIR, one a
-- line, each indented by four spaces.
function Server:temp_paths()
  local lines = {}
  for _, name in ipairs({ "client_body", "proxy", "fastcgi", "uwsgi", "scgi" }) do
    lines[#lines + 1] = ("    %s_temp_path %s/%s;\n"):format(name, self.dir, name)
  end
  return table.concat(lines)
end

--- Write the configuration, DIR/nginx.conf.
function Server:write_config(text)
  harness.write_file(self.dir .. "/nginx.conf", text)
end

--- Run nginx with `args` on this server's configuration; `globals`, if
-- given, are directives for -g. True when it exits with status 0.
function Server:nginx(args, globals)
  local q = harness.quote
  return harness.execute(("%s -p %s -c %s -e %s %s %s >>%s 2>&1"):format(q(harness.NGINX),
    q(self.prefix .. "/"), q(self.dir .. "/nginx.conf"), q(self.dir .. "/error.log"),
    globals and "-g " .. q(globals) or "", args, q(self.dir .. "/nginx.out")))
end

--- The last 3000 bytes of the error log and nginx's output, for messages.
function Server:log_tail()
  local log = (harness.read_file(self.dir .. "/error.log") or "") ..
    (harness.read_file(self.dir .. "/nginx.out") or "")
  return "\n--- error log (last 3000 bytes) ---\n" .. log:sub(-3000)
end

function Server:accepts()
  local c = socket.tcp()
  c:settimeout(1)
  local ok = c:connect("127.0.0.1", self.port)
  c:close()
  return ok ~= nil
end

--- Start nginx as a daemon, with its pid file at `pid` (default DIR/nginx.pid,
-- which the configuration names, or which `globals` sets), and wait until
-- it accepts connections.
function Server:start(globals, pid)
  self.globals = globals
  self.pid_file = pid or self.dir .. "/nginx.pid"
  assert(self:nginx("", globals), "nginx did not start" .. self:log_tail())
  self.master = (harness.read_file(self.pid_file) or ""):match("%d+")
  assert(self.master, "no pid file" .. self:log_tail())
  -- The master calls setsid() when it daemonises, so the group is its own
  -- (checked here), never ours.
  if harness.capture("ps -o pgid= -p " .. self.master):match("%d+") == self.master then
    self.group = self.master
  end
  assert(harness.wait_until(harness.START_TIMEOUT, function() return self:accepts() end),
    "nginx does not accept on port " .. self.port .. self:log_tail())
end

--- The master's worker processes' pids.
function Server:workers()
  local pids = {}
  for pid in harness.capture("ps -o pid= --ppid " .. self.master):gmatch("%d+") do
    pids[#pids + 1] = pid
  end
  return pids
end

--- GET `path`: the status code and the body without its final newline.
function Server:get(path)
  local body, code = http.request("http://127.0.0.1:" .. self.port .. path)
  return code, body and body:gsub("\n$", "")
end

--- `nginx -s quit`, and wait for the master to exit; raises if it does not.
function Server:quit()
  assert(self:nginx("-s quit", self.globals), "nginx -s quit failed" .. self:log_tail())
  assert(harness.wait_until(harness.EXIT_TIMEOUT, function() return not harness.alive(self.master) end),
    "nginx still running " .. harness.EXIT_TIMEOUT .. " s after -s quit" .. self:log_tail())
end

--- The error log, and raise if it has a crash line.
function Server:assert_no_crash()
  local log = harness.read_file(self.dir .. "/error.log") or ""
  for _, bad in ipairs(harness.CRASH_MARKS) do
    assert(not log:find(bad, 1, true), "error log has '" .. bad .. "'" .. self:log_tail())
  end
  return log
end

-- Stop nginx whatever state it is in: TERM to the master, then KILL to its
-- process group, which takes workers left behind by a master that died too.
function Server:kill()
  local master = self.master
  if harness.alive(master) then
    harness.execute("kill -TERM " .. master)
    harness.wait_until(5, function() return not harness.alive(master) end)
  end
  if self.group then
    harness.execute("kill -KILL -- -" .. self.group .. " 2>/dev/null")
  elseif harness.alive(master) then
    harness.execute("kill -KILL " .. master)
  end
end

--- Kill what is left and remove the directory (kept with BGWORKER_KEEP=1).
function Server:cleanup()
  self:kill()
  if os.getenv("BGWORKER_KEEP") then
    print("\nnginx test directory kept: " .. self.dir)
  else
    harness.execute("rm -rf " .. harness.quote(self.dir))
  end
end

return harness
