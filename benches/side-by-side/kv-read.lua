-- OpenBao KV-v2 read of one secret: GET /v1/secret/data/k (path in the URL).
dofile((os.getenv("WRK_LUA_DIR") or ".") .. "/common.lua")

wrk.method = "GET"
wrk.headers["X-Vault-Token"] = os.getenv("BAO_TOKEN")
