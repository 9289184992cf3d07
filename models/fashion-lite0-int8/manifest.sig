{
  "algorithm": "ed25519",
  "key_id": "f659e5b717282f2f",
  "signature": "POkC3eroIpxEQ7Jk/mAesZWNlporuqr4Qgln/hqn0O38IyWWrGwt/e0JGp2KtBIjdDZxLoiJTbi9nVZKXz1dBg=="
}