-- `make bench`: run bench/run.lua on each Lua version, each section in a
-- process of its own, and bench/pool.lua (bgworker.pool's own benchmark)
-- when the pool exists; then print a table, write bench/results.json and
-- the results part of bench/README.md. Run from the repository root, after
-- the build (the Makefile does both).
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

-- Run sections of run.lua on Lua version v; `wrap` prefixes the command
-- (strace). Returns the table it printed, or nil and a message.
local function run_sections(v, sections, wrap)
  local command = table.concat({
    "env",
    "LUA_PATH=" .. shell_quote("lua/?.lua;lua/?/init.lua;bench/?.lua;;"),
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

-- bench/pool.lua prints its rows as "<name>  <wall s>  <ratio>x ...": the
-- jobs' wall time inline, on a bgworker.pool and on luv's uv.new_work.
local function pool(v)
  if not io.open("lua/bgworker/pool.lua") then
    return "pending: lua/bgworker/pool.lua does not exist yet"
  end
  local command = ("env LUA_PATH=%s LUA_CPATH=%s %s bench/pool.lua"):format(
    shell_quote("lua/?.lua;lua/?/init.lua;;"), shell_quote(BUILD .. "/" .. v .. "/?.so;;"), lua_bin(v))
  local out, ok = read_command(command)
  if not ok then
    return nil, "failed: " .. command
  end
  local r = { output = out, rows = {} }
  for line in out:gmatch("[^\n]+") do
    local name, wall, speedup = line:match("^(%S.-)%s+([%d.]+)%s+([%d.]+)x")
    if name then r.rows[#r.rows + 1] = { name = name, wall_seconds = tonumber(wall), vs_inline = tonumber(speedup) } end
  end
  r.heading = out:match("^[^\n]*")
  return r
end

--------------------------------------------------------------------------
-- Figures derived from the raw results

local function find_run(t, loop, producers, alloc)
  for _, r in ipairs(t.runs) do
    if r.loop == loop and r.producers == producers and r.alloc == (alloc or "static") then return r end
  end
end

-- The ceiling each loop is compared to: the one that drains the same way.
local CEILING_OF = { select_tight = "tight", select_dispatcher = "dispatcher", copas = "dispatcher" }

local function derive(res)
  local t = res.throughput
  if type(t) == "table" then
    for _, r in ipairs(t.runs) do
      r.of_ceiling = r.per_second / t.ceiling[CEILING_OF[r.loop]].per_second
      r.of_pure_lua = r.per_second / t.pure_lua.per_second
      r.wakeups_per_item = r.wakeups / r.delivered
    end
    for _, c in pairs(t.ceiling) do
      c.of_tight = c.per_second / t.ceiling.tight.per_second
    end
  end
  local l = res.latency
  if type(l) == "table" then
    for _, loop in ipairs { "select", "copas" } do
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
    res.luv.of_bgworker = res.luv.per_second / find_run(t, "select_tight", 1).per_second
  end
end

--------------------------------------------------------------------------
-- Targets

local function targets(v, res)
  local out = {}
  local function check(name, ok, value)
    out[#out + 1] = { target = name, met = ok and true or false, value = value }
  end
  local t, l, m, i = res.throughput, res.latency, res.memory, res.idle
  if type(t) == "table" then
    local worst, worst_wake = math.huge, 0
    for _, r in ipairs(t.runs) do
      if r.alloc == "static" then
        worst = math.min(worst, r.of_ceiling)
        worst_wake = math.max(worst_wake, r.wakeups_per_item)
      end
    end
    check("end-to-end >= 50% of the drain ceiling (worst loop)", worst >= 0.5, worst)
    if v == "5.4" then
      local r = find_run(t, "select_tight", 1)
      check(">= 5 M callbacks/s on Lua 5.4, one producer (select loop)", r.per_second >= 5e6, r.per_second)
    end
    check("wake-ups per item at saturation <= 0.01 (worst loop)", worst_wake <= 0.01, worst_wake)
  end
  if type(l) == "table" and type(l.select) == "table" then
    check("wake-ups per item at a trickle close to 1 (>= 0.9)", l.select.wakeups_per_item >= 0.9,
      l.select.wakeups_per_item)
    check("latency p50 < 50 us (select loop)", l.select.p50_us < 50, l.select.p50_us)
    check("latency p99 < 500 us (select loop)", l.select.p99_us < 500, l.select.p99_us)
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
  if type(m) == "table" then
    check("memory: <= 64 bytes per pending item beyond the payload", m.static.beyond_payload <= 64,
      m.static.beyond_payload)
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

-- Rows: a label, then a function of one version's results giving a cell.
local function rows(items)
  local function run_cell(loop, producers, alloc)
    return function(res)
      local t = res.throughput
      if type(t) ~= "table" then return "n/a" end
      local r = find_run(t, loop, producers, alloc)
      if not r then return loop == "copas" and "not available" or "n/a" end
      return ("%s/s (%s of ceiling, wake/item %.4f)"):format(si(r.per_second), pct(r.of_ceiling),
        r.wakeups_per_item)
    end
  end
  local function field(path, fmt)
    return function(res)
      local v = res
      for key in path:gmatch("[^.]+") do
        if type(v) ~= "table" then return "n/a" end
        v = v[key]
      end
      if type(v) == "string" then return v:match("^not available") and "not available" or v end
      return v == nil and "n/a" or fmt(v)
    end
  end
  local function latency(loop)
    return function(res)
      local r = type(res.latency) == "table" and res.latency[loop]
      if type(r) ~= "table" then return r and "not available" or "n/a" end
      local cell = ("p50 %.0f, p99 %.0f, max %.0f"):format(r.p50_us, r.p99_us, r.max_us)
      if r.wakeups_per_item then cell = cell .. (", wake/item %.2f"):format(r.wakeups_per_item) end
      if r.n < r.sent then cell = cell .. (", %d of %d arrived"):format(r.n, r.sent) end
      return cell
    end
  end
  local list = {
    { "**Throughput**, callbacks/s (" .. si(items) .. " items, median)" },
    { "pure-Lua loop, same callback (baseline)", field("throughput.pure_lua.per_second",
      function(x) return si(x) .. "/s" end) },
    { "drain ceiling, tight `poll()` loop", field("throughput.ceiling.tight",
      function(x) return ("%s/s, %.0f ns/item"):format(si(x.per_second), x.ns_per_item) end) },
  }
  for _, c in ipairs {
    { "dispatcher", "drain ceiling, `dispatcher:dispatch()`" },
    { "step", "drain breakdown: + vararg call layers" },
    { "pcall_step", "drain breakdown: + a pcall per item" },
    { "protect_call_step", "drain breakdown: + bgworker.protect.call per item" },
  } do
    list[#list + 1] = { c[2], field("throughput.ceiling." .. c[1], function(x)
      return ("%s/s (%s of tight), %.0f ns/item"):format(si(x.per_second), pct(x.of_tight), x.ns_per_item)
    end) }
  end
  for _, loop in ipairs { "select_tight", "select_dispatcher", "copas" } do
    for _, p in ipairs { 1, 2, 4 } do
      local label = ({ select_tight = "select + tight loop", select_dispatcher = "select + dispatch()",
        copas = "Copas (bgworker.copas)" })[loop]
      list[#list + 1] = { ("%s, %d producer%s"):format(label, p, p > 1 and "s" or ""), run_cell(loop, p) }
    end
    if loop == "select_tight" then
      list[#list + 1] = { "select + tight loop, 1 producer, malloc'd items", run_cell(loop, 1, "malloc") }
    end
  end
  list[#list + 1] = { "luv async (peer), callbacks/s", field("luv", function(x)
    return ("%s/s (x%.2g of select + tight loop, 1 producer), %.2g%% of sends arrived"):format(si(x.per_second),
      x.of_bgworker or 0 / 0, 100 * x.arrived)
  end) }
  list[#list + 1] = { "**Latency**, us, one item per ms" }
  list[#list + 1] = { "raw UDP datagram from C (baseline)", latency("raw_udp") }
  list[#list + 1] = { "select + dispatch()", latency("select") }
  list[#list + 1] = { "Copas", latency("copas") }
  -- The descriptor signal next to UDP, measured in one process (section fd,
  -- bench/fd_signal.lua): throughput of one producer, latency one item per ms.
  list[#list + 1] = { "**Descriptor signal vs UDP**, one process, 1 producer: callbacks/s; latency us" }
  for _, m in ipairs {
    { "udp_select", "UDP + select + dispatch() (baseline)" },
    { "fd_select", "eventfd + select, same drain" },
    { "pipe_select", "pipe + select, same drain" },
    { "luv", "eventfd + luv (bgworker.luv)" },
    { "cqueues", "eventfd + cqueues (bgworker.cqueues)" },
  } do
    list[#list + 1] = { m[2], function(res)
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
  end }
  list[#list + 1] = { "system calls besides the loop's wait", field("idle.helper.syscalls", tostring) }
  list[#list + 1] = { "**Memory**", field("memory.static", function(x)
    return ("%s items pending, %d bytes of payload each"):format(si(x.items), x.payload_bytes)
  end) }
  list[#list + 1] = { "bytes per pending item beyond the payload", field("memory.static.beyond_payload",
    function(x) return ("%.1f"):format(x) end) }
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
    end }
  end
  return list
end

-- The rows of the short table in bench/README.md (and every heading).
local SHORT = {
  ["pure-Lua loop, same callback (baseline)"] = true,
  ["drain ceiling, tight `poll()` loop"] = true,
  ["drain ceiling, `dispatcher:dispatch()`"] = true,
  ["drain breakdown: + bgworker.protect.call per item"] = true,
  ["select + tight loop, 1 producer"] = true,
  ["select + tight loop, 4 producers"] = true,
  ["select + dispatch(), 1 producer"] = true,
  ["Copas (bgworker.copas), 1 producer"] = true,
  ["luv async (peer), callbacks/s"] = true,
  ["raw UDP datagram from C (baseline)"] = true,
  ["select + dispatch()"] = true,
  ["Copas"] = true,
  ["eventfd + select, same drain"] = true,
  ["CPU seconds (plain loop)"] = true,
  ["system calls besides the loop's wait"] = true,
  ["bytes per pending item beyond the payload"] = true,
  ["bgworker.pool"] = true,
}

-- The table of figures (`short`: only SHORT rows), then the targets.
local function markdown(results, short)
  local header = { "figure" }
  for _, v in ipairs(VERSIONS) do header[#header + 1] = results.versions[v].lua or v end
  local lines = { "| " .. table.concat(header, " | ") .. " |",
    "|" .. string.rep(" --- |", #header) }
  local items = results.versions[VERSIONS[1]].throughput
  items = type(items) == "table" and items.items or 0
  for _, row in ipairs(rows(items)) do
    if not short or SHORT[row[1]] or row[1]:match("^%*%*") then
      local cells = { row[1] }
      for _, v in ipairs(VERSIONS) do
        cells[#cells + 1] = row[2] and row[2](results.versions[v]) or ""
      end
      lines[#lines + 1] = "| " .. table.concat(cells, " | ") .. " |"
    end
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "| target | " .. table.concat(header, " | ", 2) .. " |"
  lines[#lines + 1] = "|" .. string.rep(" --- |", #header)
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
    lines[#lines + 1] = "| " .. table.concat(cells, " | ") .. " |"
  end
  return table.concat(lines, "\n")
end

local function update_readme(results, table_text)
  local f = io.open(README)
  local text = f and f:read("*a") or ""
  if f then f:close() end
  local begin_mark, end_mark = "<!-- results: written by bench/bench.lua -->", "<!-- end of results -->"
  local section = ("%s\n%s on %s (nproc %s, %s, Linux %s).\n\n%s\n%s"):format(begin_mark, results.date,
    results.machine.cpu, results.machine.nproc, results.machine.memory, results.machine.kernel, table_text, end_mark)
  local a = text:find(begin_mark, 1, true)
  local _, b = text:find(end_mark, 1, true)
  if a and b then
    text = text:sub(1, a - 1) .. section .. text:sub(b + 1)
  else
    text = text .. "\n" .. section .. "\n"
  end
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

local table_text = markdown(results, false)
print(("bgworker benchmarks, %s, %s, nproc %d"):format(results.date, results.machine.cpu, results.machine.nproc))
print(table_text)
local f = assert(io.open(RESULTS, "w"))
f:write(json(results), "\n")
f:close()
update_readme(results, markdown(results, true))
print("written: " .. RESULTS .. ", " .. README)
if #failures > 0 then
  io.stderr:write("bench: failed sections:\n  ", table.concat(failures, "\n  "), "\n")
  os.exit(1)
end
