{
  "algorithm": "ed25519",
  "key_id": "f659e5b717282f2f",
  "signature": "rumcP5MypE/Kz4KSuZECG0eIM8nN3JCdHcE7XoY1IQwTuGHWxbLq+sIHhb9Ra2LddAjj6onWdDyHhZkWJ31iCQ=="
}