-- `make bench`: run bench/run.lua on each Lua version, each section in a
-- process of its own, and bench/pool.lua (bgworker.pool's own benchmark)
-- when the pool exists; then print a table, write bench/results.json, the
-- pictures (bench/plot.lua, with gnuplot) and the generated parts of
-- bench/README.md. Run from the repository root, after the build and the
-- Copas trees (the Makefile does both).
--
--   BENCH_LUA   the Lua versions, as the Makefile names them ("5.4 jit")
--   BENCH_BUILD the build directory ("build")
-- and run.lua's sizes (BENCH_ITEMS, ...), passed on as they are.

local VERSIONS = {}
for v in (os.getenv("BENCH_LUA") or "5.4 jit"):gmatch("%S+") do VERSIONS[#VERSIONS + 1] = v end
local BUILD = os.getenv("BENCH_BUILD") or "build"
local SECTIONS = { "throughput", "latency", "memory", "luv", "fd" }
local README = "bench/README.md"
local RESULTS = "bench/results.json"

local function lua_bin(v)
  return v == "jit" and "luajit" or "lua" .. v
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function read_command(command)
  local p = assert(io.popen(command))
  local out = p:read("*a")
  local ok = p:close()
  return out, ok
end

local function first_line(command)
  return (read_command(command):match("[^\n]*"))
end

local function has_command(name)
  return first_line("command -v " .. name .. " 2>/dev/null") ~= ""
end

-- Copas 4 (`make copas-<ver>`: a LuaRocks tree per version) first on
-- LUA_PATH, as the specs have it.
local function copas_path(v)
  local dir = ("%s/rocks/%s/share/lua/%s"):format(BUILD, v, v == "jit" and "5.1" or v)
  return ("%s/?.lua;%s/?/init.lua;"):format(dir, dir)
end

-- Run sections of run.lua on Lua version v; `wrap` prefixes the command
-- (strace). Returns the table it printed, or nil and a message.
local function run_sections(v, sections, wrap)
  local command = table.concat({
    "env",
    "LUA_PATH=" .. shell_quote(copas_path(v) .. "lua/?.lua;lua/?/init.lua;bench/?.lua;;"),
    "LUA_CPATH=" .. shell_quote(BUILD .. "/" .. v .. "/?.so;;"),
    wrap or "",
    lua_bin(v), "bench/run.lua", table.concat(sections, " "),
  }, " ")
  local out, ok = read_command(command)
  if not ok then
    return nil, "failed: " .. command
  end
  local chunk, err = load(out, "=run.lua output", "t", {})
  if not chunk then
    return nil, err
  end
  return chunk()
end

-- The idle section under `strace -f`: the system calls between each
-- phase's markers, other than the loop's own wait.
local WAITS = { select = true, pselect6 = true, poll = true, ppoll = true, epoll_wait = true,
  epoll_pwait = true }

local function count_syscalls(trace_file, phase)
  local inside, calls, names = false, 0, {}
  for line in io.lines(trace_file) do
    if line:find("bgworker-bench-" .. phase .. "-begin", 1, true) then
      inside = true
    elseif line:find("bgworker-bench-" .. phase .. "-end", 1, true) then
      inside = false
    elseif inside and not line:find("resumed>", 1, true) then
      local name = line:match("^%d+%s+([%w_]+)%(")
      if name and not WAITS[name] then
        calls = calls + 1
        names[#names + 1] = name
      end
    end
  end
  return calls, table.concat(names, " ")
end

local function idle(v)
  if not has_command("strace") then
    local r, err = run_sections(v, { "idle" })
    if r then r.idle.syscalls = "strace not available" end
    return r and r.idle, err
  end
  local trace = os.tmpname()
  local r, err = run_sections(v, { "idle" }, "strace -f -qq -o " .. trace)
  if r then
    for _, phase in ipairs { "helper", "baseline" } do
      r.idle[phase].syscalls, r.idle[phase].syscall_names = count_syscalls(trace, phase)
    end
  end
  os.remove(trace)
  return r and r.idle, err
end

-- bench/pool.lua prints sections of rows: the jobs' wall time ("<name>
-- <wall s> <x>x <CPU/wall>": inline, a bgworker.pool, luv's uv.new_work),
-- empty jobs per second ("<name> <jobs/s> <x>x", x: of luv's), the cancel
-- latency ("<label> <p50> <p99> <max>", ms) and the close time of a pool
-- whose jobs never end ("<label> <ms> ms, all joined").
local POOL_SECTIONS = {
  { "^Empty jobs", "empty" }, { "^Cancelling", "cancel" }, { "^Closing", "close" }, { "^A CPU%-bound", "hook" },
}

local function parse_pool(out)
  local r = { output = out, rows = {}, empty = {}, heading = out:match("^[^\n]*") }
  local section = "wall"
  for line in out:gmatch("[^\n]+") do
    for _, s in ipairs(POOL_SECTIONS) do
      if line:match(s[1]) then section = s[2] end
    end
    local name, a, b = line:match("^(%S.-)%s+([%d.]+)%s+([%d.]+)x")
    if section == "wall" and name then
      r.rows[#r.rows + 1] = { name = name, wall_seconds = tonumber(a), vs_inline = tonumber(b) }
    elseif section == "empty" and name then
      r.empty[#r.empty + 1] = { name = name, jobs_per_second = tonumber(a), vs_luv = tonumber(b) }
    elseif section == "empty" and line:match("^idle") then
      r.idle_cpu_seconds = tonumber(line:match("([%d.]+) CPU s"))
    elseif section == "cancel" then
      local p50, p99, max = line:match("([%d.]+)%s+([%d.]+)%s+([%d.]+)%s*$")
      if p50 then r.cancel = { p50_ms = tonumber(p50), p99_ms = tonumber(p99), max_ms = tonumber(max) } end
    elseif line:match("ms, ") then
      local label, ms, joined = line:match("^(.-)%s*([%d.]+) ms, (.*)$")
      local key = label:match("jit on") and "close_jit_on" or "close"
      r[key] = { ms = tonumber(ms), joined = joined == "all joined" }
    end
  end
  return r
end

local function pool(v)
  local command = ("env LUA_PATH=%s LUA_CPATH=%s %s bench/pool.lua"):format(
    shell_quote("lua/?.lua;lua/?/init.lua;;"), shell_quote(BUILD .. "/" .. v .. "/?.so;;"), lua_bin(v))
  local out, ok = read_command(command)
  if not ok then
    return nil, "failed: " .. command
  end
  return parse_pool(out)
end

--------------------------------------------------------------------------
-- Figures derived from the raw results

local function find_run(t, loop, producers, alloc)
  for _, r in ipairs(t.runs) do
    if r.loop == loop and r.producers == producers and r.alloc == (alloc or "static") then return r end
  end
end

-- The ceiling each loop is compared to: the one that drains the same way,
-- for dispatch() the same kind of items too.
local CEILING_OF = { select_tight = "tight", select_dispatcher = "dispatcher", copas = "dispatcher" }
local function ceiling_of(t, r)
  local same_items = r.loop == "select_dispatcher" and t.ceiling["dispatcher_" .. r.alloc]
  return same_items or t.ceiling[CEILING_OF[r.loop]]
end
local LATENCY_LOOPS = { "select", "eventfd", "luv", "copas" }

local function derive(res)
  local t = res.throughput
  if type(t) == "table" then
    for _, r in ipairs(t.runs) do
      r.of_ceiling = r.per_second / ceiling_of(t, r).per_second
      r.of_pure_lua = r.per_second / t.pure_lua.per_second
      r.wakeups_per_item = r.wakeups / r.delivered
    end
    for _, c in pairs(t.ceiling) do
      c.of_in_place = c.per_second / t.ceiling.dispatcher_in_place.per_second
      c.of_tight = c.per_second / t.ceiling.tight.per_second
      c.of_pure_lua = c.per_second / t.pure_lua.per_second
      c.of_pure_lua_table = c.per_second / t.pure_lua_table.per_second
    end
  end
  local l = res.latency
  if type(l) == "table" then
    for _, loop in ipairs(LATENCY_LOOPS) do
      local r = l[loop]
      if type(r) == "table" then
        r.wakeups_per_item = r.wakeups / r.delivered
        r.p50_of_raw_udp = r.p50_us / l.raw_udp.p50_us
        r.p99_of_raw_udp = r.p99_us / l.raw_udp.p99_us
      end
    end
  end
  local m = res.memory
  if type(m) == "table" then
    for _, r in pairs(m) do
      r.beyond_payload = r.bytes_per_item - r.payload_bytes
    end
  end
  if type(res.luv) == "table" and type(t) == "table" then
    res.luv.of_bgworker = res.luv.per_second / find_run(t, "select_dispatcher", 1, "malloc").per_second
  end
end

--------------------------------------------------------------------------
-- Targets: issue 12's goals, issues 8's and 18's (the pool), and those of the first
-- benchmark that still say something (wake-ups, idle). Each is checked
-- where the goal names a version, else on every one.

local function targets(v, res)
  local out = {}
  local function check(name, ok, value)
    out[#out + 1] = { target = name, met = ok and true or false, value = value }
  end
  local t, l, m, i = res.throughput, res.latency, res.memory, res.idle
  if type(t) == "table" then
    local ceiling = t.ceiling.dispatcher
    if v == "5.4" then
      check("drain ceiling through dispatch() >= 0.30 of the pure-Lua loop (Lua 5.4)", ceiling.of_pure_lua >= 0.3,
        ceiling.of_pure_lua)
    end
    local one, four = find_run(t, "select_dispatcher", 1), find_run(t, "select_dispatcher", 4)
    check("select + dispatch(), 1 producer >= 0.80 of that ceiling", one.of_ceiling >= 0.8, one.of_ceiling)
    check("select + dispatch(), 4 producers >= 0.70 of that ceiling", four.of_ceiling >= 0.7, four.of_ceiling)
    if v == "jit" then
      check("LuaJIT: >= 12 M callbacks/s through dispatch() (drain ceiling)", ceiling.per_second >= 12e6,
        ceiling.per_second)
    end
    if v == "5.4" or v == "jit" then
      check("runners cost callbacks that do not wait <= 10% (drain ceiling >= 0.90 of the one in place)",
        ceiling.of_in_place >= 0.9, ceiling.of_in_place)
    end
    local copas = find_run(t, "copas", 1)
    if v == "5.4" then
      check("Copas 4 reader, 1 producer, >= 0.70 of the dispatch() ceiling (Lua 5.4)",
        copas and copas.of_ceiling >= 0.7, copas and copas.of_ceiling or 0)
    end
    if v == "5.4" then
      -- Issue 22's: small records delivered by copy, and the malloc path kept.
      local copy1, copy2 = find_run(t, "select_dispatcher", 1, "copy"), find_run(t, "select_dispatcher", 2, "copy")
      check("deliver_copy, 1 producer >= 0.55 of its drain ceiling (Lua 5.4)", copy1.of_ceiling >= 0.55,
        copy1.of_ceiling)
      check("deliver_copy, 2 producers >= 0.50 of its drain ceiling (Lua 5.4)", copy2.of_ceiling >= 0.5,
        copy2.of_ceiling)
      local malloc1 = find_run(t, "select_dispatcher", 1, "malloc")
      check("deliver (malloc), 1 producer >= 0.075 of the pure-Lua loop (Lua 5.4)", malloc1.of_pure_lua >= 0.075,
        malloc1.of_pure_lua)
    end
    local worst_wake = 0
    for _, r in ipairs(t.runs) do worst_wake = math.max(worst_wake, r.wakeups_per_item) end
    check("wake-ups per item at saturation <= 0.01 (worst loop)", worst_wake <= 0.01, worst_wake)
  end
  if type(l) == "table" and type(l.select) == "table" then
    check("latency, UDP: p50 <= 1.2x a raw datagram's", l.select.p50_of_raw_udp <= 1.2, l.select.p50_of_raw_udp)
    check("latency, UDP: p99 <= 1.5x a raw datagram's", l.select.p99_of_raw_udp <= 1.5, l.select.p99_of_raw_udp)
    if type(l.eventfd) == "table" then
      check("latency, eventfd: p50 <= 15 us", l.eventfd.p50_us <= 15, l.eventfd.p50_us)
    end
    check("wake-ups per item at a trickle close to 1 (>= 0.9)", l.select.wakeups_per_item >= 0.9,
      l.select.wakeups_per_item)
  end
  if type(m) == "table" then
    check("memory: <= 40 bytes per pending item beyond the payload", m.static.beyond_payload <= 40,
      m.static.beyond_payload)
  end
  if type(i) == "table" then
    local calls = i.helper.syscalls
    if type(calls) == "number" then
      check("idle: no helper system calls", calls == 0, calls)
    end
    -- "No CPU": not above what the same loop costs without the helper, to
    -- within a millisecond of clock resolution and noise.
    check("idle: no CPU beyond the plain loop's (+1 ms)", i.helper.cpu_seconds <= i.baseline.cpu_seconds + 0.001,
      i.helper.cpu_seconds)
  end
  -- Issue 18's: bgworker.pool against luv's uv.new_work, with the job's
  -- function written inline (a new closure per job) and made once, and
  -- idle; issue 8's: cancelling.
  local p = res.pool
  if type(p) == "table" then
    local inline, once = p.empty[1], p.empty[2]
    if inline and inline.vs_luv then
      check("pool: empty jobs, new closure per job >= 1.0x luv's uv.new_work", inline.vs_luv >= 1, inline.vs_luv)
    end
    if once and once.vs_luv then
      check("pool: empty jobs, one function >= 1.5x luv's uv.new_work", once.vs_luv >= 1.5, once.vs_luv)
    end
    local on_pool = p.rows[2]
    if v == "jit" and on_pool then
      check("LuaJIT: CPU-bound jobs on 2 threads, default options, >= 1.6x inline", on_pool.vs_inline >= 1.6,
        on_pool.vs_inline)
    end
    if p.idle_cpu_seconds then
      check("pool: no CPU while idle (<= 1 ms over 1 s)", p.idle_cpu_seconds <= 0.001, p.idle_cpu_seconds)
    end
    if p.cancel then
      check("pool: cancel latency of a CPU-bound job, p99 <= 50 ms", p.cancel.p99_ms <= 50, p.cancel.p99_ms)
    end
  end
  return out
end

--------------------------------------------------------------------------
-- JSON

local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n == #t
end

local function json(v, indent)
  indent = indent or ""
  local kind = type(v)
  if kind == "nil" then
    return "null"
  elseif kind == "boolean" then
    return tostring(v)
  elseif kind == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return ("%d"):format(v) end
    return ("%.6g"):format(v)
  elseif kind == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c)
      return ({ ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t" })[c] or
        ("\\u%04x"):format(c:byte())
    end) .. '"'
  end
  local inner, parts = indent .. "  ", {}
  if is_array(v) and next(v) ~= nil then
    for _, x in ipairs(v) do parts[#parts + 1] = inner .. json(x, inner) end
    return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  for _, k in ipairs(keys) do parts[#parts + 1] = inner .. json(k) .. ": " .. json(v[k], inner) end
  if #parts == 0 then return "{}" end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end

--------------------------------------------------------------------------
-- The table

local function si(x)
  if type(x) ~= "number" then return "n/a" end
  if x >= 1e6 then return ("%.2f M"):format(x / 1e6) end
  if x >= 1e3 then return ("%.1f k"):format(x / 1e3) end
  return ("%.0f"):format(x)
end

local function pct(x) return ("%.0f%%"):format(100 * x) end

-- The value at `path` ("a.b.c") of a version's results, or nil.
local function at(res, path)
  local v = res
  for key in path:gmatch("[^.]+") do
    if type(v) ~= "table" then return nil end
    v = v[key]
  end
  return v
end

-- A cell of the value at `path`: "not available" and failures as they
-- are, "n/a" when missing, else fmt(value).
local function field(path, fmt)
  return function(res)
    local v = at(res, path)
    if type(v) == "string" then return v:match("^not available") and "not available" or v end
    return v == nil and "n/a" or fmt(v)
  end
end

-- `of_pure_lua`: say also how it compares to the pure-Lua loop.
local function run_cell(loop, producers, alloc, of_pure_lua)
  return function(res)
    local t = res.throughput
    if type(t) ~= "table" then return "n/a" end
    local r = find_run(t, loop, producers, alloc)
    if not r then return loop == "copas" and "not available" or "n/a" end
    local pure = of_pure_lua and (", %.3f of pure Lua"):format(r.of_pure_lua) or ""
    return ("%s/s (%s of ceiling%s, wake/item %.4f)"):format(si(r.per_second), pct(r.of_ceiling), pure,
      r.wakeups_per_item)
  end
end

local function latency_cell(loop)
  return function(res)
    local r = type(res.latency) == "table" and res.latency[loop]
    if type(r) ~= "table" then return r and "not available" or "n/a" end
    local cell = ("p50 %.0f, p99 %.0f, max %.0f"):format(r.p50_us, r.p99_us, r.max_us)
    if r.p50_of_raw_udp then
      cell = cell .. (" (x%.2f, x%.2f of raw)"):format(r.p50_of_raw_udp, r.p99_of_raw_udp)
    end
    if r.wakeups_per_item then cell = cell .. (", wake/item %.2f"):format(r.wakeups_per_item) end
    if r.n < r.sent then cell = cell .. (", %d of %d arrived"):format(r.n, r.sent) end
    return cell
  end
end

local function ceiling_cell(x)
  return ("%s/s (%s of the pure-Lua loop, %s of the table one), %.0f ns/item"):format(si(x.per_second),
    pct(x.of_pure_lua), pct(x.of_pure_lua_table), x.ns_per_item)
end

-- Rows: a label, then a function of one version's results giving a cell.
-- `short` marks the rows of the short table in bench/README.md (headings
-- are in both).
local function rows(items)
  local list = {
    { "**Throughput**, callbacks/s (" .. si(items) .. " items, median)" },
    { "select + dispatch(), 1 producer, malloc'd items freed by the core",
      run_cell("select_dispatcher", 1, "malloc", true), short = true },
    { "pure-Lua loop, same callback called directly", field("throughput.pure_lua.per_second",
      function(x) return si(x) .. "/s" end), short = true },
    { "pure-Lua loop through a table of 64 callbacks (not inlined)", field("throughput.pure_lua_table.per_second",
      function(x) return si(x) .. "/s" end), short = true },
    { "drain ceiling, `dispatcher:dispatch()`", field("throughput.ceiling.dispatcher", ceiling_cell), short = true },
    { "drain ceiling, `dispatch()`, malloc'd items", field("throughput.ceiling.dispatcher_malloc", ceiling_cell),
      short = true },
    { "drain ceiling, `dispatch()` with drains in place (no runner: the baseline before callbacks could wait)",
      field("throughput.ceiling.dispatcher_in_place", ceiling_cell) },
    { "runners' cost: drain ceiling through runners, of the one in place", field("throughput.ceiling.dispatcher",
      function(x) return pct(x.of_in_place) end), short = true },
    { "breakdown: tight `poll()` loop, static items", field("throughput.ceiling.tight",
      function(x) return ("%s/s, %.0f ns/item"):format(si(x.per_second), x.ns_per_item) end), short = true },
  }
  for _, c in ipairs {
    { "step", "breakdown: `poll()` + vararg call layers" },
    { "pcall_step", "breakdown: `poll()` + a pcall per item" },
    { "protect_call_step", "breakdown: `poll()` + bgworker.protect.call per item" },
  } do
    list[#list + 1] = { c[2], field("throughput.ceiling." .. c[1], function(x)
      return ("%s/s (%s of tight), %.0f ns/item"):format(si(x.per_second), pct(x.of_tight), x.ns_per_item)
    end) }
  end
  local LABELS = { select_dispatcher = "select + dispatch()", select_tight = "select + tight `poll()` loop",
    copas = "Copas (bgworker.copas)" }
  for _, loop in ipairs { "select_dispatcher", "copas", "select_tight" } do
    for _, p in ipairs { 1, 2, 4 } do
      list[#list + 1] = { ("%s, %d producer%s"):format(LABELS[loop], p, p > 1 and "s" or ""), run_cell(loop, p),
        short = loop ~= "select_tight" and p ~= 2 }
    end
    if loop == "select_dispatcher" then
      for _, alloc in ipairs { "malloc", "copy" } do
        local what = alloc == "copy" and "records by `deliver_copy`" or "malloc'd items"
        -- The malloc'd 1-producer run heads the table.
        for _, p in ipairs(alloc == "copy" and { 1, 2, 4 } or { 2, 4 }) do
          list[#list + 1] = { ("select + dispatch(), %d producer%s, %s"):format(p, p > 1 and "s" or "", what),
            run_cell(loop, p, alloc, true), short = p ~= 2 }
        end
      end
      list[#list + 1] = { "drain ceiling, `dispatch()`, records by `deliver_copy`",
        field("throughput.ceiling.dispatcher_copy", ceiling_cell), short = true }
      for _, alloc in ipairs { "malloc", "copy" } do
        list[#list + 1] = { ("breakdown: 1 producer alone (no drain), %s"):format(alloc == "copy" and
          "`deliver_copy`" or "malloc'd items"), field("throughput.producer_alone." .. alloc,
          function(x) return si(x.per_second) .. "/s" end) }
      end
    elseif loop == "select_tight" then
      list[#list + 1] = { "select + tight `poll()` loop, 1 producer, malloc'd items", run_cell(loop, 1, "malloc") }
    end
  end
  list[#list + 1] = { "luv async (peer), callbacks/s", field("luv", function(x)
    return ("%s/s (x%.2g of select + dispatch(), malloc'd), %.2g%% of sends arrived"):format(si(x.per_second),
      x.of_bgworker or 0 / 0, 100 * x.arrived)
  end), short = true }
  list[#list + 1] = { "**Latency**, us, one item per ms" }
  for _, l in ipairs {
    { "raw_udp", "raw UDP datagram from C (baseline)" },
    { "select", "select + dispatch(), UDP" },
    { "eventfd", "select + dispatch(), eventfd" },
    { "luv", "luv (bgworker.luv, eventfd)" },
    { "copas", "Copas (UDP)" },
  } do
    list[#list + 1] = { l[2], latency_cell(l[1]), short = true }
  end
  -- The descriptor signal next to UDP, measured in one process (section fd,
  -- bench/fd_signal.lua): throughput of one producer, latency one item per ms.
  list[#list + 1] = { "**Descriptor signal vs UDP**, one process, 1 producer: callbacks/s; latency us" }
  for _, m in ipairs {
    { "udp_select", "UDP + select + dispatch() (baseline)" },
    { "fd_select", "eventfd + select + dispatch()" },
    { "pipe_select", "pipe + select + dispatch()" },
    { "luv", "eventfd + luv (bgworker.luv)" },
    { "cqueues", "eventfd + cqueues (bgworker.cqueues)" },
  } do
    list[#list + 1] = { m[2], short = m[1] == "fd_select", function(res)
      local fd = res.fd
      if type(fd) ~= "table" then return fd and "not available" or "n/a" end
      local t, l = fd.throughput[m[1]], fd.latency[m[1]]
      local bt, bl = fd.throughput.udp_select, fd.latency.udp_select
      if type(t) ~= "table" or type(l) ~= "table" then return "not available" end
      return ("%s/s (%.2fx), p50 %.0f (%.2fx), p99 %.0f (%.2fx)"):format(si(t.per_second),
        t.per_second / bt.per_second, l.p50_us, l.p50_us / bl.p50_us, l.p99_us, l.p99_us / bl.p99_us)
    end }
  end
  list[#list + 1] = { "**Idle**, started helper, select loop" }
  list[#list + 1] = { "CPU seconds (plain loop)", function(res)
    local i = res.idle
    if type(i) ~= "table" then return "n/a" end
    return ("%.4f over %g s (%.4f)"):format(i.helper.cpu_seconds, i.helper.seconds, i.baseline.cpu_seconds)
  end, short = true }
  list[#list + 1] = { "system calls besides the loop's wait", field("idle.helper.syscalls", tostring), short = true }
  list[#list + 1] = { "**Memory**", field("memory.static", function(x)
    return ("%s items pending, %d bytes of payload each"):format(si(x.items), x.payload_bytes)
  end) }
  list[#list + 1] = { "bytes per pending item beyond the payload", field("memory.static.beyond_payload",
    function(x) return ("%.1f"):format(x) end), short = true }
  list[#list + 1] = { "same, items malloc'd (malloc's own overhead included)", field("memory.malloc.beyond_payload",
    function(x) return ("%.1f"):format(x) end) }
  list[#list + 1] = { "RSS MB: base, pending, drained, stopped", field("memory.static", function(x)
    return ("%.1f, %.1f, %.1f, %.1f"):format(x.rss_base / 2 ^ 20, x.rss_pending / 2 ^ 20, x.rss_drained / 2 ^ 20,
      x.rss_stopped / 2 ^ 20)
  end) }
  list[#list + 1] = { "**Pool** (bench/pool.lua): wall seconds of CPU-bound jobs" }
  for i, name in ipairs { "inline", "bgworker.pool", "luv uv.new_work" } do
    list[#list + 1] = { name, function(res)
      local p = res.pool
      if type(p) ~= "table" then return p or "n/a" end
      local r = p.rows[i]
      return r and ("%.3f s (x%.2f of inline) %s"):format(r.wall_seconds, r.vs_inline, r.name) or "n/a"
    end, short = name == "bgworker.pool" }
  end
  local empty_jobs = "empty jobs per second, bgworker.pool: new closure per job, one function (luv uv.new_work)"
  list[#list + 1] = { empty_jobs, function(res)
    local e = at(res, "pool.empty")
    if type(e) ~= "table" or not e[3] then return "n/a" end
    return ("%s/s (x%.2f), %s/s (x%.2f) of luv's %s/s"):format(si(e[1].jobs_per_second), e[1].vs_luv,
      si(e[2].jobs_per_second), e[2].vs_luv, si(e[3].jobs_per_second))
  end, short = true }
  list[#list + 1] = { "cancel latency of a running job, ms", field("pool.cancel", function(x)
    return ("p50 %.3f, p99 %.3f, max %.3f"):format(x.p50_ms, x.p99_ms, x.max_ms)
  end), short = true }
  list[#list + 1] = { "close time, every worker running `while true do end`", field("pool.close", function(x)
    return ("%.1f ms, %s"):format(x.ms, x.joined and "all joined" or "abandoned")
  end), short = true }
  return list
end

local function header(results)
  local cells = { "figure" }
  for _, v in ipairs(VERSIONS) do cells[#cells + 1] = results.versions[v].lua or v end
  return cells
end

local function table_lines(cells_list)
  local lines = {}
  for i, cells in ipairs(cells_list) do
    lines[#lines + 1] = "| " .. table.concat(cells, " | ") .. " |"
    if i == 1 then lines[#lines + 1] = "|" .. string.rep(" --- |", #cells) end
  end
  return lines
end

-- The table of figures (`short`: only the short rows and the headings),
-- then the targets.
local function markdown(results, short)
  local items = results.versions[VERSIONS[1]].throughput
  items = type(items) == "table" and items.items or 0
  local figures = { header(results) }
  for _, row in ipairs(rows(items)) do
    if not short or row.short or row[1]:match("^%*%*") then
      local cells = { row[1] }
      for _, v in ipairs(VERSIONS) do
        cells[#cells + 1] = row[2] and row[2](results.versions[v]) or ""
      end
      figures[#figures + 1] = cells
    end
  end
  local goals = { header(results) }
  goals[1][1] = "target"
  local names, by_name = {}, {}
  for _, v in ipairs(VERSIONS) do
    for _, t in ipairs(results.versions[v].targets) do
      if not by_name[t.target] then
        names[#names + 1] = t.target
        by_name[t.target] = {}
      end
      by_name[t.target][v] = t
    end
  end
  for _, name in ipairs(names) do
    local cells = { name }
    for _, v in ipairs(VERSIONS) do
      local t = by_name[name][v]
      cells[#cells + 1] = t and (("%s (%.3g)"):format(t.met and "met" or "**missed**", t.value)) or "-"
    end
    goals[#goals + 1] = cells
  end
  local lines = table_lines(figures)
  lines[#lines + 1] = ""
  for _, line in ipairs(table_lines(goals)) do lines[#lines + 1] = line end
  return table.concat(lines, "\n")
end

-- The opening figure of bench/README.md: what a user's dispatch() loop
-- does with malloc'd items, next to the ceiling, the pure-Lua loop and luv.
local function headline(results)
  local cells = { { "Lua", "select + dispatch(), malloc'd items, 1 producer",
    "dispatch() drain ceiling, malloc'd (static) items", "pure-Lua loop (table of callbacks)", "luv async (peer)" } }
  for _, v in ipairs(VERSIONS) do
    local res = results.versions[v]
    local t = type(res.throughput) == "table" and res.throughput
    local run = t and find_run(t, "select_dispatcher", 1, "malloc")
    cells[#cells + 1] = {
      res.lua or v,
      run and ("**%s/s**"):format(si(run.per_second)) or "n/a",
      t and ("%s/s (%s/s)"):format(si(t.ceiling.dispatcher_malloc.per_second), si(t.ceiling.dispatcher.per_second))
        or "n/a",
      t and ("%s/s (direct call: %s/s)"):format(si(t.pure_lua_table.per_second), si(t.pure_lua.per_second)) or "n/a",
      type(res.luv) == "table" and ("%s/s, %.0f%% of sends arrived"):format(si(res.luv.per_second),
        100 * res.luv.arrived) or "n/a",
    }
  end
  return table.concat(table_lines(cells), "\n")
end

-- Replace the text between `begin_mark` and `end_mark` in `text`.
local function replace_between(text, begin_mark, end_mark, body)
  local section = begin_mark .. "\n" .. body .. "\n" .. end_mark
  local a = text:find(begin_mark, 1, true)
  local _, b = text:find(end_mark, 1, true)
  if a and b then
    return text:sub(1, a - 1) .. section .. text:sub(b + 1)
  end
  return text .. "\n" .. section .. "\n"
end

local function update_readme(results, table_text)
  local f = io.open(README)
  local text = f and f:read("*a") or ""
  if f then f:close() end
  local machine = ("%s on %s (nproc %s, %s, Linux %s)"):format(results.date, results.machine.cpu,
    results.machine.nproc, results.machine.memory, results.machine.kernel)
  text = replace_between(text, "<!-- headline: written by bench/bench.lua -->", "<!-- end of headline -->",
    headline(results) .. "\n\n" .. machine .. ".")
  text = replace_between(text, "<!-- results: written by bench/bench.lua -->", "<!-- end of results -->",
    machine .. ".\n\n" .. table_text)
  f = assert(io.open(README, "w"))
  f:write(text)
  f:close()
end

--------------------------------------------------------------------------

local function memory_total()
  for line in io.lines("/proc/meminfo") do
    local kb = line:match("^MemTotal:%s+(%d+)")
    if kb then return ("%.0f GiB RAM"):format(kb / 2 ^ 20) end
  end
  return "?"
end

local results = {
  date = os.date("!%Y-%m-%d %H:%M UTC"),
  machine = {
    nproc = tonumber(first_line("nproc")),
    cpu = first_line("grep -m1 '^model name' /proc/cpuinfo"):match(":%s*(.*)") or "?",
    kernel = first_line("uname -r"),
    memory = memory_total(),
  },
  versions = {},
}
local failures = {}
for _, v in ipairs(VERSIONS) do
  local res = {}
  for _, section in ipairs(SECTIONS) do
    local r, err = run_sections(v, { section })
    if r then
      res.lua, res.bgworker = r.lua, r.bgworker
      res[section] = r[section]
    else
      res[section] = "failed: " .. tostring(err)
      failures[#failures + 1] = v .. " " .. section .. ": " .. tostring(err)
    end
  end
  local r, err = idle(v)
  res.idle = r or ("failed: " .. tostring(err))
  if not r then failures[#failures + 1] = v .. " idle: " .. tostring(err) end
  r, err = pool(v)
  res.pool = r or ("failed: " .. tostring(err))
  if not r then failures[#failures + 1] = v .. " pool: " .. tostring(err) end
  derive(res)
  res.targets = targets(v, res)
  results.versions[v] = res
end

local plotted, plot_err = dofile("bench/plot.lua")(results, VERSIONS)
if not plotted then failures[#failures + 1] = "plots: " .. tostring(plot_err) end

local table_text = markdown(results, false)
print(("bgworker benchmarks, %s, %s, nproc %d"):format(results.date, results.machine.cpu, results.machine.nproc))
print(table_text)
local f = assert(io.open(RESULTS, "w"))
f:write(json(results), "\n")
f:close()
update_readme(results, markdown(results, true))
print("written: " .. RESULTS .. ", " .. README .. (plotted and ", " .. table.concat(plotted, ", ") or ""))
if #failures > 0 then
  io.stderr:write("bench: failed sections:\n  ", table.concat(failures, "\n  "), "\n")
  os.exit(1)
end
