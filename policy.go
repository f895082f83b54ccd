package vigthoria
