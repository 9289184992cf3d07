{
  "algorithm": "ed25519",
  "key_id": "f659e5b717282f2f",
  "signature": "MwAj5V0xRzTPT7yNKFjLG70Rodzs1zSb5MsOoYRtljA5nhHP1/R1D/cRSXVzq8hNZPqXKaTyPcMAn7PkbocRAQ=="
}