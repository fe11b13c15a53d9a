-- The pictures of bench/README.md, drawn by gnuplot (Debian's gnuplot-nox)
-- from the results that bench/bench.lua gathered:
--
--   bench/latency.png     the latency distribution, one item per ms: raw
--                         datagram, UDP, eventfd, luv, Copas; a panel per
--                         Lua version
--   bench/throughput.png  callbacks/s against producers, next to the
--                         dispatch() drain ceiling; a panel per Lua version
--
-- dofile("bench/plot.lua")(results, versions) returns the files written,
-- or nil and a message.

local LATENCY = {
  { "raw_udp", "raw UDP datagram (baseline)" },
  { "select", "select + dispatch(), UDP" },
  { "eventfd", "select + dispatch(), eventfd" },
  { "luv", "luv (bgworker.luv)" },
  { "copas", "Copas" },
}

local THROUGHPUT = {
  { "select_dispatcher", "static", "select + dispatch()" },
  { "select_dispatcher", "malloc", "select + dispatch(), malloc'd items" },
  { "copas", "static", "Copas" },
  { "select_tight", "static", "select + tight poll() loop" },
}

local function quote(s)
  return '"' .. s:gsub('"', '\\"') .. '"'
end

-- A gnuplot datablock named `name` with rows of numbers.
local function datablock(name, data_rows)
  local lines = { "$" .. name .. " << EOD" }
  for _, row in ipairs(data_rows) do lines[#lines + 1] = table.concat(row, " ") end
  lines[#lines + 1] = "EOD"
  return table.concat(lines, "\n")
end

local function latency_panel(res, v, script)
  local plots = {}
  for i, l in ipairs(LATENCY) do
    local r = type(res.latency) == "table" and res.latency[l[1]]
    if type(r) == "table" and r.quantiles then
      local name = ("lat_%s_%d"):format(v:gsub("%W", ""), i)
      local data_rows = {}
      for q, us in ipairs(r.quantiles) do data_rows[#data_rows + 1] = { ("%.3f"):format(us), q } end
      script[#script + 1] = datablock(name, data_rows)
      plots[#plots + 1] = ("$%s using 1:2 with lines lw 2 title %s"):format(name,
        quote(("%s (p50 %.0f)"):format(l[2], r.p50_us)))
    end
  end
  script[#script + 1] = ("set title %s"):format(quote((res.lua or v) .. ": latency, one item per ms"))
  script[#script + 1] = "plot " .. table.concat(plots, ", ")
end

local function throughput_panel(res, v, script)
  local t = res.throughput
  if type(t) ~= "table" then return end
  local plots = {}
  for i, s in ipairs(THROUGHPUT) do
    local data_rows = {}
    for _, r in ipairs(t.runs) do
      if r.loop == s[1] and r.alloc == s[2] then data_rows[#data_rows + 1] = { r.producers, r.per_second / 1e6 } end
    end
    table.sort(data_rows, function(a, b) return a[1] < b[1] end)
    if #data_rows > 0 then
      local name = ("tp_%s_%d"):format(v:gsub("%W", ""), i)
      script[#script + 1] = datablock(name, data_rows)
      plots[#plots + 1] = ("$%s using 1:2 with linespoints lw 2 pt 7 title %s"):format(name, quote(s[3]))
    end
  end
  plots[#plots + 1] = ("%.3f with lines dt 2 lw 2 title %s"):format(t.ceiling.dispatcher.per_second / 1e6,
    quote("dispatch() drain ceiling"))
  script[#script + 1] = ("set title %s"):format(quote((res.lua or v) .. ": throughput against producers"))
  script[#script + 1] = "plot " .. table.concat(plots, ", ")
end

local function draw(file, versions, results, setup, panel)
  local script = {
    ("set terminal pngcairo size %d,420 font 'sans,9'"):format(560 * #versions),
    "set output " .. quote(file),
    ("set multiplot layout 1,%d"):format(#versions),
    "set grid",
    setup,
  }
  for _, v in ipairs(versions) do panel(results.versions[v], v, script) end
  script[#script + 1] = "unset multiplot"
  local gnuplot = io.popen("gnuplot 2>&1", "w")
  if not gnuplot then return nil, "cannot run gnuplot" end
  gnuplot:write(table.concat(script, "\n"), "\n")
  local ok = gnuplot:close()
  if not ok then return nil, "gnuplot failed on " .. file end
  return true
end

return function(results, versions)
  if not io.popen("command -v gnuplot"):read("*l") then
    return nil, "gnuplot not found (scripts/setup-deps installs gnuplot-nox)"
  end
  local files = {
    { "bench/latency.png", table.concat({
      "set logscale x", "set xlabel 'microseconds from deliver to callback'", "set ylabel 'percent of items'",
      "set yrange [0:100]", "set key bottom right",
    }, "\n"), latency_panel },
    { "bench/throughput.png", table.concat({
      "set xlabel 'producer threads'", "set ylabel 'million callbacks/s'", "set xtics (1, 2, 4)",
      "set xrange [0.8:4.2]", "set yrange [0:*]", "set key top right", "set offsets 0, 0, graph 0.5, 0",
    }, "\n"), throughput_panel },
  }
  local written = {}
  for _, f in ipairs(files) do
    local ok, err = draw(f[1], versions, results, f[2], f[3])
    if not ok then return nil, err end
    written[#written + 1] = f[1]
  end
  return written
end
