{
  "algorithm": "ed25519",
  "key_id": "f659e5b717282f2f",
  "signature": "r0mEZV8+xX1WJT7EkCBewL07zuc09JocucApNnKhVMRhMO1zvvTIdmeP8S/RmPzM22ci/GhDuNFBza6IOMjQBw=="
}