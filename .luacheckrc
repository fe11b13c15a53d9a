-- luacheck configuration: `luacheck lua spec examples bench`
std = "max"

files["spec"] = {
  std = "+busted",
}

files["examples/server_spec.lua"] = {
  std = "+busted",
}
