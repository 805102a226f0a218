-- OpenBao KV-v2 write: POST /v1/secret/data/w-<run>-<thread>-<n>, a new key
-- per request (so every request is a real raft write, not a no-op), with a
-- small JSON body.
dofile((os.getenv("WRK_LUA_DIR") or ".") .. "/common.lua")

local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local counter = 0
local tag = os.getenv("RUN_TAG") or "run"
local body = '{"data":{"v":"0123456789abcdef0123456789abcdef"}}'

wrk.method = "POST"
wrk.headers["X-Vault-Token"] = os.getenv("BAO_TOKEN")
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  return wrk.format(nil, "/v1/secret/data/w-" .. tag .. "-" .. tostring(tid) .. "-" .. counter, nil, body)
end
