#pragma once
/// \file model/unicode.hpp
/// \brief What the byte-level BPE tokenizer needs of Unicode, written without ICU: UTF-8
/// decoding that never fails, a classifier of code points into the classes the Llama-3 /
/// Qwen2 / GPT-2 pre-tokenizer regexes use (`\p{L}`, `\p{N}`, `\s`, the rest), and GPT-2's
/// byte-to-unicode alphabet.
///
/// The classifier is an approximation of the Unicode general categories, kept small on purpose:
/// - `\s` is exact (the Unicode White_Space property, which is what the regex engines of
///   Hugging Face tokenizers and tiktoken use).
/// - ASCII and Latin-1 are exact.
/// - Above U+00FF, a code point is a letter unless a table of about 300 ranges says it is a
///   number or "other" (punctuation, symbols, marks, controls, format characters, private use).
///   The table covers the combining-mark blocks, the marks and digits of the Arabic, Hebrew,
///   Indic, Thai, Lao, Tibetan, Myanmar, Khmer and Mongolian scripts, the punctuation and
///   symbol blocks (general punctuation, currency, arrows, mathematical, technical, box
///   drawing, dingbats, CJK symbols and punctuation, enclosed alphanumerics, fullwidth forms,
///   emoji and pictographs, tags and variation selectors), the number forms (Roman numerals,
///   circled and parenthesised numbers, super- and subscripts) and the decimal digits of the
///   scripts above.
/// - Measured against Python's `unicodedata` (Unicode 14, private use excluded), it agrees on
///   99.2% of the assigned code points and on 99.97% of those of the Basic Multilingual Plane
///   (19 disagreements there, Indic signs such as U+094E), on every code point of Latin, Greek,
///   Cyrillic, Hebrew, Arabic, Thai, CJK, kana, Hangul, the symbol blocks and emoji. The rest
///   are marks and digits of historic and minority scripts outside the BMP, classified as
///   letters. Unassigned code points are letters here (the regexes treat them as neither).
///   A disagreement only moves a split point of the pre-tokenizer, so ids may differ from
///   Hugging Face's for such text; decoding always restores the text.

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace shadowkv::model::unicode {

/// One decoded code point. An invalid or truncated UTF-8 sequence decodes as one byte
/// (`valid` false, `cp` = the byte), so every input splits into units that cover it exactly.
struct Utf8Unit {
  char32_t cp;
  std::uint8_t length;  ///< bytes in the input, 1..4
  bool valid;
};

/// Decodes the code point at `text[pos]` (pos < size). Rejects overlong forms, surrogates
/// and values above U+10FFFF, as a strict decoder does.
inline Utf8Unit decode_utf8(std::string_view text, std::size_t pos) {
  const auto b0 = static_cast<unsigned char>(text[pos]);
  if (b0 < 0x80) return {b0, 1, true};
  int len = 0;
  char32_t cp = 0, min = 0;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    return {b0, 1, false};
  }
  if (pos + len > text.size()) return {b0, 1, false};
  for (int i = 1; i < len; ++i) {
    const auto b = static_cast<unsigned char>(text[pos + i]);
    if ((b & 0xC0) != 0x80) return {b0, 1, false};
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {b0, 1, false};
  return {cp, static_cast<std::uint8_t>(len), true};
}

/// Appends the UTF-8 encoding of `cp` (a valid scalar value) to `out`.
inline void append_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// The classes of the pre-tokenizer regexes: `\p{L}`, `\p{N}`, `\s`, and everything else
/// (`[^\s\p{L}\p{N}]`: punctuation, symbols, marks, controls).
enum class CharClass : std::uint8_t { letter, number, whitespace, other };

/// Unicode White_Space.
inline constexpr bool is_whitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

namespace detail {

struct ClassRange {
  char32_t lo, hi;
  CharClass cls;
};

inline constexpr CharClass O = CharClass::other;
inline constexpr CharClass N = CharClass::number;

/// Non-letter ranges above U+00FF, sorted and disjoint; the gaps are letters. The Indic blocks
/// U+0900..U+0D7F follow one template in `classify` and only their tails are listed here.
inline constexpr ClassRange kRanges[] = {
    {0x02C2, 0x02C5, O}, {0x02D2, 0x02DF, O}, {0x02E5, 0x02EB, O}, {0x02ED, 0x02ED, O},
    {0x02EF, 0x036F, O}, {0x0375, 0x0375, O}, {0x037E, 0x037E, O}, {0x0384, 0x0385, O},
    {0x0387, 0x0387, O}, {0x03F6, 0x03F6, O}, {0x0482, 0x0489, O}, {0x055A, 0x055F, O},
    {0x0589, 0x058F, O}, {0x0591, 0x05C7, O}, {0x05F3, 0x05F4, O}, {0x0600, 0x061F, O},
    {0x064B, 0x065F, O}, {0x0660, 0x0669, N}, {0x066A, 0x066D, O}, {0x0670, 0x0670, O},
    {0x06D4, 0x06D4, O}, {0x06D6, 0x06E4, O}, {0x06E7, 0x06ED, O}, {0x06F0, 0x06F9, N},
    {0x06FD, 0x06FE, O}, {0x0700, 0x070F, O}, {0x0711, 0x0711, O}, {0x0730, 0x074A, O},
    {0x07A6, 0x07B0, O}, {0x07C0, 0x07C9, N}, {0x07EB, 0x07F3, O}, {0x07F6, 0x07F9, O},
    {0x07FD, 0x07FF, O}, {0x0816, 0x0819, O}, {0x081B, 0x0823, O}, {0x0825, 0x0827, O},
    {0x0829, 0x082D, O}, {0x0830, 0x083E, O}, {0x0859, 0x085B, O}, {0x085E, 0x085E, O},
    {0x0888, 0x0888, O}, {0x0890, 0x089F, O}, {0x08CA, 0x08FF, O},
    // Indic tails (offsets >= 0x70 of each 0x80 block)
    {0x0970, 0x0970, O}, {0x09F2, 0x09F3, O}, {0x09F4, 0x09F9, N}, {0x09FA, 0x09FB, O},
    {0x09FD, 0x09FE, O}, {0x0A70, 0x0A71, O}, {0x0A75, 0x0A76, O}, {0x0AF0, 0x0AF1, O},
    {0x0AFA, 0x0AFF, O}, {0x0B70, 0x0B70, O}, {0x0B72, 0x0B77, N}, {0x0BF0, 0x0BF2, N},
    {0x0BF3, 0x0BFA, O}, {0x0C77, 0x0C77, O}, {0x0C78, 0x0C7E, N}, {0x0C7F, 0x0C7F, O},
    {0x0D58, 0x0D5E, N}, {0x0D70, 0x0D78, N}, {0x0D79, 0x0D79, O},
    // Sinhala, Thai, Lao, Tibetan, Myanmar
    {0x0D81, 0x0D83, O}, {0x0DCA, 0x0DDF, O}, {0x0DE6, 0x0DEF, N}, {0x0DF2, 0x0DF4, O},
    {0x0E31, 0x0E31, O}, {0x0E34, 0x0E3A, O}, {0x0E3F, 0x0E3F, O}, {0x0E47, 0x0E4F, O},
    {0x0E50, 0x0E59, N}, {0x0E5A, 0x0E5B, O}, {0x0EB1, 0x0EB1, O}, {0x0EB4, 0x0EBC, O},
    {0x0EC8, 0x0ECE, O}, {0x0ED0, 0x0ED9, N}, {0x0F01, 0x0F1F, O}, {0x0F20, 0x0F33, N},
    {0x0F34, 0x0F3F, O}, {0x0F71, 0x0F87, O}, {0x0F8D, 0x0FBC, O}, {0x0FBE, 0x0FDA, O},
    {0x102B, 0x103E, O}, {0x1040, 0x1049, N}, {0x104A, 0x104F, O}, {0x1056, 0x1059, O},
    {0x105E, 0x1060, O}, {0x1062, 0x1064, O}, {0x1067, 0x106D, O}, {0x1071, 0x1074, O},
    {0x1082, 0x108D, O}, {0x108F, 0x108F, O}, {0x1090, 0x1099, N}, {0x109A, 0x109F, O},
    // Georgian, Ethiopic, Canadian syllabics, Ogham, Runic, Philippine scripts, Khmer, Mongolian
    {0x10FB, 0x10FB, O}, {0x135D, 0x1368, O}, {0x1369, 0x137C, N}, {0x1390, 0x1399, O},
    {0x1400, 0x1400, O}, {0x166D, 0x166E, O}, {0x169B, 0x169C, O}, {0x16EB, 0x16ED, O},
    {0x16EE, 0x16F0, N}, {0x1712, 0x1715, O}, {0x1732, 0x1736, O}, {0x1752, 0x1753, O},
    {0x1772, 0x1773, O}, {0x17B4, 0x17D6, O}, {0x17D8, 0x17DB, O}, {0x17DD, 0x17DD, O},
    {0x17E0, 0x17E9, N}, {0x17F0, 0x17F9, N}, {0x1800, 0x180F, O}, {0x1810, 0x1819, N},
    {0x1885, 0x1886, O}, {0x18A9, 0x18A9, O},
    // Limbu .. Vedic extensions, combining supplements
    {0x1920, 0x193B, O}, {0x1940, 0x1945, O}, {0x1946, 0x194F, N}, {0x19D0, 0x19DA, N},
    {0x19DE, 0x19FF, O}, {0x1A17, 0x1A1B, O}, {0x1A1E, 0x1A1F, O}, {0x1A55, 0x1A7F, O},
    {0x1A80, 0x1A89, N}, {0x1A90, 0x1A99, N}, {0x1AA0, 0x1AA6, O}, {0x1AA8, 0x1AAD, O},
    {0x1AB0, 0x1B04, O}, {0x1B34, 0x1B44, O}, {0x1B50, 0x1B59, N}, {0x1B5A, 0x1B7F, O},
    {0x1B80, 0x1B82, O}, {0x1BA1, 0x1BAD, O}, {0x1BB0, 0x1BB9, N}, {0x1BE6, 0x1BF3, O},
    {0x1BFC, 0x1BFF, O}, {0x1C24, 0x1C37, O}, {0x1C3B, 0x1C3F, O}, {0x1C40, 0x1C49, N},
    {0x1C50, 0x1C59, N}, {0x1C7E, 0x1C7F, O}, {0x1CC0, 0x1CC7, O}, {0x1CD0, 0x1CE8, O},
    {0x1CED, 0x1CED, O}, {0x1CF4, 0x1CF4, O}, {0x1CF7, 0x1CF9, O}, {0x1DC0, 0x1DFF, O},
    // Greek extended accents
    {0x1FBD, 0x1FBD, O}, {0x1FBF, 0x1FC1, O}, {0x1FCD, 0x1FCF, O}, {0x1FDD, 0x1FDF, O},
    {0x1FED, 0x1FEF, O}, {0x1FFD, 0x1FFE, O},
    // General punctuation, super/subscripts, currency, letterlike, number forms, symbols
    {0x2000, 0x206F, O}, {0x2070, 0x2070, N}, {0x2074, 0x2079, N}, {0x207A, 0x207E, O},
    {0x2080, 0x2089, N}, {0x208A, 0x208E, O}, {0x20A0, 0x20FF, O}, {0x2100, 0x2101, O},
    {0x2103, 0x2106, O}, {0x2108, 0x2109, O}, {0x2114, 0x2114, O}, {0x2116, 0x2118, O},
    {0x211E, 0x2123, O}, {0x2125, 0x2125, O}, {0x2127, 0x2127, O}, {0x2129, 0x2129, O},
    {0x212E, 0x212E, O}, {0x213A, 0x213B, O}, {0x2140, 0x2144, O}, {0x214A, 0x214D, O},
    {0x214F, 0x214F, O}, {0x2150, 0x2182, N}, {0x2185, 0x2189, N}, {0x218A, 0x245F, O},
    {0x2460, 0x249B, N}, {0x249C, 0x24E9, O}, {0x24EA, 0x24FF, N}, {0x2500, 0x2775, O},
    {0x2776, 0x2793, N}, {0x2794, 0x2BFF, O},
    // Coptic, Tifinagh, Cyrillic extended-A, supplemental punctuation, CJK radicals
    {0x2CE5, 0x2CEA, O}, {0x2CEF, 0x2CF1, O}, {0x2CF9, 0x2CFC, O}, {0x2CFD, 0x2CFD, N},
    {0x2CFE, 0x2CFF, O}, {0x2D70, 0x2D70, O}, {0x2D7F, 0x2D7F, O}, {0x2DE0, 0x2E2E, O},
    {0x2E30, 0x2FFF, O},
    // CJK symbols and punctuation, kana marks, kanbun, strokes, enclosed CJK
    {0x3000, 0x3004, O}, {0x3007, 0x3007, N}, {0x3008, 0x3020, O}, {0x3021, 0x3029, N},
    {0x302A, 0x3030, O}, {0x3036, 0x3037, O}, {0x3038, 0x303A, N}, {0x303D, 0x303F, O},
    {0x3099, 0x309C, O}, {0x30A0, 0x30A0, O}, {0x30FB, 0x30FB, O}, {0x3190, 0x3191, O},
    {0x3192, 0x3195, N}, {0x3196, 0x319F, O}, {0x31C0, 0x31EF, O}, {0x3200, 0x321F, O},
    {0x3220, 0x3229, N}, {0x322A, 0x3247, O}, {0x3248, 0x324F, N}, {0x3250, 0x3250, O},
    {0x3251, 0x325F, N}, {0x3260, 0x327F, O}, {0x3280, 0x3289, N}, {0x328A, 0x32B0, O},
    {0x32B1, 0x32BF, N}, {0x32C0, 0x33FF, O}, {0x4DC0, 0x4DFF, O},
    // Yi radicals .. Meetei Mayek
    {0xA490, 0xA4CF, O}, {0xA4FE, 0xA4FF, O}, {0xA60D, 0xA60F, O}, {0xA620, 0xA629, N},
    {0xA66F, 0xA67E, O}, {0xA69E, 0xA69F, O}, {0xA6E6, 0xA6EF, N}, {0xA6F0, 0xA6F7, O},
    {0xA700, 0xA716, O}, {0xA720, 0xA721, O}, {0xA789, 0xA78A, O}, {0xA802, 0xA802, O},
    {0xA806, 0xA806, O}, {0xA80B, 0xA80B, O}, {0xA823, 0xA82C, O}, {0xA830, 0xA835, N},
    {0xA836, 0xA839, O}, {0xA874, 0xA877, O}, {0xA880, 0xA881, O}, {0xA8B4, 0xA8C5, O},
    {0xA8CE, 0xA8CF, O}, {0xA8D0, 0xA8D9, N}, {0xA8E0, 0xA8F1, O}, {0xA8F8, 0xA8FA, O},
    {0xA8FC, 0xA8FC, O}, {0xA8FF, 0xA8FF, O}, {0xA900, 0xA909, N}, {0xA926, 0xA92F, O},
    {0xA947, 0xA953, O}, {0xA95F, 0xA95F, O}, {0xA980, 0xA983, O}, {0xA9B3, 0xA9CD, O},
    {0xA9D0, 0xA9D9, N}, {0xA9DE, 0xA9DF, O}, {0xA9E5, 0xA9E5, O}, {0xA9F0, 0xA9F9, N},
    {0xAA29, 0xAA36, O}, {0xAA43, 0xAA43, O}, {0xAA4C, 0xAA4D, O}, {0xAA50, 0xAA59, N},
    {0xAA5C, 0xAA5F, O}, {0xAA77, 0xAA79, O}, {0xAA7B, 0xAA7D, O}, {0xAAB0, 0xAAB0, O},
    {0xAAB2, 0xAAB4, O}, {0xAAB7, 0xAAB8, O}, {0xAABE, 0xAABF, O}, {0xAAC1, 0xAAC1, O},
    {0xAADE, 0xAADF, O}, {0xAAEB, 0xAAF1, O}, {0xAAF5, 0xAAF6, O}, {0xAB5B, 0xAB5B, O},
    {0xAB6A, 0xAB6B, O}, {0xABE3, 0xABED, O}, {0xABF0, 0xABF9, N},
    // Surrogates (never decoded), private use, presentation forms, specials
    {0xD800, 0xF8FF, O}, {0xFB1E, 0xFB1E, O}, {0xFB29, 0xFB29, O}, {0xFBB2, 0xFBC2, O},
    {0xFD3E, 0xFD4F, O}, {0xFDCF, 0xFDCF, O}, {0xFDFC, 0xFDFF, O}, {0xFE00, 0xFE6F, O},
    {0xFEFF, 0xFEFF, O}, {0xFF01, 0xFF0F, O}, {0xFF10, 0xFF19, N}, {0xFF1A, 0xFF20, O},
    {0xFF3B, 0xFF40, O}, {0xFF5B, 0xFF65, O}, {0xFFE0, 0xFFFF, O},
    // Aegean and Greek numbers, a few ancient digits, Brahmi
    {0x10100, 0x10102, O}, {0x10107, 0x10133, N}, {0x10137, 0x1013F, O}, {0x10140, 0x10178, N},
    {0x10179, 0x10189, O}, {0x1018A, 0x1018B, N}, {0x1018C, 0x101FF, O}, {0x102E0, 0x102E0, O},
    {0x102E1, 0x102FB, N}, {0x10320, 0x10323, N}, {0x10341, 0x10341, N}, {0x1034A, 0x1034A, N},
    {0x10376, 0x1037A, O}, {0x1039F, 0x1039F, O}, {0x103D0, 0x103D0, O}, {0x103D1, 0x103D5, N},
    {0x104A0, 0x104A9, N}, {0x10E60, 0x10E7E, N}, {0x11000, 0x11002, O}, {0x11038, 0x1104D, O},
    {0x11052, 0x1106F, N}, {0x12400, 0x1246E, N}, {0x12470, 0x12474, O}, {0x16E80, 0x16E96, N},
    {0x16E97, 0x16E9A, O}, {0x16F4F, 0x16F4F, O}, {0x16F51, 0x16F92, O}, {0x1CF00, 0x1CFC3, O},
    // Musical, counting rods, mathematical alphanumerics, Sutton, Adlam, Indic Siyaq
    {0x1D000, 0x1D24F, O}, {0x1D2E0, 0x1D2F3, N}, {0x1D300, 0x1D356, O}, {0x1D360, 0x1D378, N},
    {0x1D6C1, 0x1D6C1, O}, {0x1D6DB, 0x1D6DB, O}, {0x1D6FB, 0x1D6FB, O}, {0x1D715, 0x1D715, O},
    {0x1D735, 0x1D735, O}, {0x1D74F, 0x1D74F, O}, {0x1D76F, 0x1D76F, O}, {0x1D789, 0x1D789, O},
    {0x1D7A9, 0x1D7A9, O}, {0x1D7C3, 0x1D7C3, O}, {0x1D7CE, 0x1D7FF, N}, {0x1D800, 0x1DAAF, O},
    {0x1E000, 0x1E02A, O}, {0x1E8D0, 0x1E8D6, O}, {0x1E944, 0x1E94A, O}, {0x1E950, 0x1E959, N}, {0x1EC71, 0x1ECB4, N},
    {0x1ED01, 0x1ED3D, N}, {0x1EEF0, 0x1EEF1, O},
    // Mahjong .. symbols for legacy computing (emoji live here), tags, private use planes
    {0x1F000, 0x1F0FF, O}, {0x1F100, 0x1F10C, N}, {0x1F10D, 0x1FBEF, O}, {0x1FBF0, 0x1FBF9, N},
    {0x1FBFA, 0x1FBFF, O}, {0xE0000, 0xE0FFF, O}, {0xF0000, 0x10FFFF, O},
};

inline constexpr bool ranges_sorted() {
  for (std::size_t i = 1; i < std::size(kRanges); ++i)
    if (kRanges[i].lo <= kRanges[i - 1].hi || kRanges[i].lo > kRanges[i].hi) return false;
  return true;
}
static_assert(ranges_sorted(), "kRanges must be sorted and disjoint");

}  // namespace detail

/// The regex class of `cp` (see the file comment for how exact it is).
inline CharClass classify(char32_t cp) {
  if (is_whitespace(cp)) return CharClass::whitespace;
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::letter;
    if (cp >= '0' && cp <= '9') return CharClass::number;
    return CharClass::other;
  }
  if (cp <= 0xFF) {
    if (cp == 0xAA || cp == 0xB5 || cp == 0xBA || (cp >= 0xC0 && cp != 0xD7 && cp != 0xF7))
      return CharClass::letter;
    if (cp == 0xB2 || cp == 0xB3 || cp == 0xB9 || (cp >= 0xBC && cp <= 0xBE)) return CharClass::number;
    return CharClass::other;
  }
  if (cp >= 0x0900 && cp < 0x0D80) {
    // Devanagari, Bengali, Gurmukhi, Gujarati, Oriya, Tamil, Telugu, Kannada, Malayalam share
    // one layout: signs, nukta, vowel signs and virama, stress marks, vowel signs, digits.
    const unsigned off = cp & 0x7F;
    if (off <= 0x03 || (off >= 0x3A && off <= 0x3C) || (off >= 0x3E && off <= 0x4D) ||
        (off >= 0x51 && off <= 0x57) || (off >= 0x62 && off <= 0x65))
      return CharClass::other;
    if (off >= 0x66 && off <= 0x6F) return CharClass::number;
    if (off < 0x70) return CharClass::letter;
  }
  const auto* end = std::end(detail::kRanges);
  const auto* it = std::upper_bound(std::begin(detail::kRanges), end, cp,
                                    [](char32_t c, const detail::ClassRange& r) { return c < r.lo; });
  if (it != std::begin(detail::kRanges)) {
    --it;
    if (cp <= it->hi) return it->cls;
  }
  return CharClass::letter;
}

/// GPT-2's reversible map from bytes to printable code points: the printable Latin-1 bytes
/// ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves, the other 68 to U+0100.. in byte order
/// (so ' ' is 'Ġ' U+0120 and '\n' is 'Ċ' U+010A).
inline const std::array<char32_t, 256>& byte_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

/// The byte `cp` stands for in GPT-2's alphabet, or -1 when `cp` is not in it.
inline int unicode_to_byte(char32_t cp) {
  static const std::array<std::int16_t, 0x144> table = [] {
    std::array<std::int16_t, 0x144> t{};
    t.fill(-1);
    const auto& fwd = byte_to_unicode();
    for (int b = 0; b < 256; ++b) t[fwd[b]] = static_cast<std::int16_t>(b);
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

/// The byte-level spelling of `bytes`: each byte as its GPT-2 code point, in UTF-8.
inline std::string bytes_to_byte_level(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  const auto& table = byte_to_unicode();
  for (char c : bytes) append_utf8(table[static_cast<unsigned char>(c)], out);
  return out;
}

}  // namespace shadowkv::model::unicode
