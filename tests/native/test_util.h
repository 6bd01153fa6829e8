// Minimal test helpers for the native tests (no framework dependency).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#define EXPECT(cond)                                                                 \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

// Runs `stmt`, expects a std::exception whose message contains every given fragment.
#define EXPECT_THROWS_WITH(stmt, ...)                                                                       \
  do {                                                                                                      \
    bool thrown_ = false;                                                                                   \
    try {                                                                                                   \
      stmt;                                                                                                 \
    } catch (const std::exception& e_) {                                                                    \
      thrown_ = true;                                                                                       \
      std::string msg_ = e_.what();                                                                         \
      for (const char* frag_ : {__VA_ARGS__}) {                                                             \
        if (msg_.find(frag_) == std::string::npos) {                                                        \
          std::fprintf(stderr, "%s:%d: message lacks '%s': %s\n", __FILE__, __LINE__, frag_, msg_.c_str()); \
          std::exit(1);                                                                                     \
        }                                                                                                   \
      }                                                                                                     \
    }                                                                                                       \
    if (!thrown_) {                                                                                         \
      std::fprintf(stderr, "%s:%d: expected an exception from %s\n", __FILE__, __LINE__, #stmt);            \
      std::exit(1);                                                                                         \
    }                                                                                                       \
  } while (0)
