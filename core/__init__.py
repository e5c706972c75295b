"""The torch-free core every stage shares: errors, atomic files, the image rule, the bundle contract."""
