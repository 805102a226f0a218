-- OpenBao Transit decrypt of one ciphertext made at set-up:
-- POST /v1/transit/decrypt/k (path in the URL).
dofile((os.getenv("WRK_LUA_DIR") or ".") .. "/common.lua")

wrk.method = "POST"
wrk.headers["X-Vault-Token"] = os.getenv("BAO_TOKEN")
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"ciphertext":"' .. os.getenv("BAO_CIPHERTEXT") .. '"}'
