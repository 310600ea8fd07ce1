/* A dependency-free RGB8 PNG writer for the C samples: zlib "stored" blocks
   (no compression), so it needs only CRC-32 and Adler-32. */
#ifndef SPO_EXAMPLE_PNG_WRITE_H
#define SPO_EXAMPLE_PNG_WRITE_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t png_crc(const uint8_t *p, size_t n, uint32_t c) {
  c = ~c;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

static void png_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static void png_chunk(FILE *f, const char *type, const uint8_t *data, uint32_t len) {
  uint8_t hdr[8];
  png_be32(hdr, len);
  memcpy(hdr + 4, type, 4);
  fwrite(hdr, 1, 8, f);
  if (len) fwrite(data, 1, len, f);
  uint32_t c = png_crc(hdr + 4, 4, 0);
  c = png_crc(data, len, c);
  uint8_t crc[4];
  png_be32(crc, c);
  fwrite(crc, 1, 4, f);
}

/* Writes `height` rows of `stride` bytes (3 bytes per pixel). Returns 0 on success. */
static int png_write_rgb(const char *path, const uint8_t *rgb, uint32_t width, uint32_t height, uint32_t stride) {
  size_t row = (size_t)width * 3 + 1, raw_len = row * height;
  uint8_t *raw = malloc(raw_len);
  if (!raw) return -1;
  for (uint32_t y = 0; y < height; y++) {
    raw[y * row] = 0; /* filter: none */
    memcpy(raw + y * row + 1, rgb + (size_t)y * stride, (size_t)width * 3);
  }
  size_t blocks = raw_len / 65535 + 1, z_len = 2 + raw_len + blocks * 5 + 4;
  uint8_t *z = malloc(z_len);
  if (!z) { free(raw); return -1; }
  size_t o = 0, left = raw_len, pos = 0;
  z[o++] = 0x78; z[o++] = 0x01;
  do {
    uint16_t n = left > 65535 ? 65535 : (uint16_t)left;
    z[o++] = left <= 65535 ? 1 : 0;
    z[o++] = (uint8_t)n; z[o++] = (uint8_t)(n >> 8);
    z[o++] = (uint8_t)~n; z[o++] = (uint8_t)(~n >> 8);
    memcpy(z + o, raw + pos, n);
    o += n; pos += n; left -= n;
  } while (left > 0);
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < raw_len; i++) { a = (a + raw[i]) % 65521; b = (b + a) % 65521; }
  png_be32(z + o, (b << 16) | a);
  o += 4;
  FILE *f = fopen(path, "wb");
  int rc = -1;
  if (f) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t ihdr[13];
    png_be32(ihdr, width); png_be32(ihdr + 4, height);
    ihdr[8] = 8; ihdr[9] = 2; ihdr[10] = 0; ihdr[11] = 0; ihdr[12] = 0;
    fwrite(sig, 1, 8, f);
    png_chunk(f, "IHDR", ihdr, 13);
    png_chunk(f, "IDAT", z, (uint32_t)o);
    png_chunk(f, "IEND", NULL, 0);
    rc = fclose(f) == 0 ? 0 : -1;
  }
  free(raw);
  free(z);
  return rc;
}
#endif
