-- Runs deploy/argocd/health.lua on a fixture as Argo CD would (the object as the global
-- `obj`) and prints the result as JSON. Usage: lua5.1 run.lua <health.lua> <fixture.json>
local cjson = require "cjson"
local file = assert(io.open(arg[2]))
local fixture = cjson.decode(file:read("*a"))
file:close()
obj = fixture.object
local check = assert(loadfile(arg[1]))
local hs = check()
print(cjson.encode({ status = hs.status, message = hs.message }))
