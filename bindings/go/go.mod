module spo-runtime/spo

go 1.19
