-- A long-lived job fed by messages: the job counts the words of the lines
-- the program sends it (job:send), which it takes one by one
-- (bgworker.worker's receive), and reports its running total as progress.
-- A message of nil ends it. send never waits: at 64 lines waiting for the
-- job it returns false, "full", and the program lets the job catch up.

local bgworker = require "bgworker"
local pool = require "bgworker.pool"

local d = bgworker.new() -- { loop = "select" }: get runs it while it waits
local workers = pool.new { threads = 1 }

local counter = workers:submit(function(every)
  local worker = require "bgworker.worker"
  local lines, words = 0, 0
  while true do
    local line = worker.receive()
    if line == nil then break end
    lines = lines + 1
    for _ in line:gmatch("%S+") do words = words + 1 end
    if lines % every == 0 then worker.progress(lines, words) end
  end
  return lines, words
end, 250)

counter:on_progress(function(lines, words)
  print(("so far: %d lines, %d words"):format(lines, words))
end)

local full = 0
for i = 1, 1000 do
  local line = ("line %d of the input"):format(i)
  while true do
    local sent, why = counter:send(line)
    if sent then break end
    assert(why == "full", why)
    full = full + 1
    -- Let the job catch up: the dispatcher runs meanwhile.
    counter:get(0.001)
  end
end
counter:send(nil)
print("counted:", counter:get(5))
print("sends refused as full, then sent again:", full)

workers:close()
d:stop()
