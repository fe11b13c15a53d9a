-- Check the indentation of Lua files against .editorconfig's Lua settings
-- (indent_style = space, indent_size = N): no tabs in indentation, and the
-- first line inside each block indented exactly one level (N spaces) more
-- than the line that opened it. Long strings and long comments are
-- skipped, and so are lines inside them.
--
--   lua scripts/check-indent.lua FILE...
--
-- Prints "file:line: message" for each fault and exits 1 if there was any.

local function indent_size()
  local f = assert(io.open(".editorconfig"))
  local size, in_lua = nil, false
  for line in f:lines() do
    local section = line:match("^%[(.*)%]$")
    if section then
      in_lua = section:find("lua", 1, true) ~= nil
    elseif in_lua then
      size = tonumber(line:match("^%s*indent_size%s*=%s*(%d+)")) or size
    end
  end
  f:close()
  return assert(size, ".editorconfig has no indent_size for Lua files")
end

local SIZE = indent_size()

-- Does this code (comments and strings removed) open a block whose body
-- starts on the next line?
local function opens(code)
  return code:match("[%s%)]then$") or code:match("^then$") or code:match("%f[%w_]do$") or
    code:match("%f[%w_]else$") or code:match("%f[%w_]repeat$") or
    code:match("%f[%w_]function[%w_%.:%s]*%b()$") or code:match("[{%(]$")
end

-- Does this code leave its statement unfinished, so that the next line
-- continues it (an operator, a comma, or an open bracket last)?
local function continues(code)
  return code:match("[,%.%+%-%*/%%%^=<>~]$") or code:match("%f[%w_]and$") or code:match("%f[%w_]or$") or
    code:match("%f[%w_]not$") or code:match("[{%(%[]$")
end

-- Does this line close a block (so it is not the first line of a body)?
local function closes(code)
  return code:match("^end%f[^%w_]") or code:match("^[}%)%]]") or code:match("^until%f[^%w_]") or
    code:match("^else") or code:match("^elseif%f[^%w_]")
end

-- The line without its short strings and comment; `long` tells whether a
-- long string or comment starts on it and does not end there.
local function code_of(line)
  local s = line:gsub("\\.", "xx"):gsub('"[^"]*"', '""'):gsub("'[^']*'", "''")
  local long = s:match("%[(=*)%[") and not s:match("%]" .. (s:match("%[(=*)%[") or "") .. "%]")
  s = s:gsub("%-%-.*$", ""):gsub("%[=*%[.*$", "[[")
  return (s:gsub("%s+$", "")), long and s:match("%[(=*)%[") or nil
end

local faults = 0

local function fault(file, n, msg)
  faults = faults + 1
  io.write(("%s:%d: %s\n"):format(file, n, msg))
end

for _, file in ipairs(arg) do
  local f = assert(io.open(file))
  local opener -- indentation of a line that opened a block just before
  local base -- indentation of the first line of the current statement
  local continued = false -- the line before left its statement unfinished
  local closing -- the end of a long string or comment we are in
  local n = 0
  for line in f:lines() do
    n = n + 1
    if closing then
      if line:find(closing, 1, true) then
        closing = nil
      end
    else
      local lead = line:match("^(%s*)")
      if lead:find("\t") then
        fault(file, n, "tab in indentation")
      end
      local code, long = code_of(line)
      if code:match("%S") then
        local indent = #lead
        if opener and not closes(code:gsub("^%s+", "")) and indent ~= opener + SIZE then
          fault(file, n, ("indented %d spaces; the block opened above wants %d"):format(indent, opener + SIZE))
        end
        if not continued or code:match("^%s*[}%)%]]") then
          base = indent
        end
        opener = opens(code) and base or nil
        continued = not opener and continues(code)
      end
      if long then
        closing = "]" .. long .. "]"
      end
    end
  end
  f:close()
end

os.exit(faults == 0 and 0 or 1)
