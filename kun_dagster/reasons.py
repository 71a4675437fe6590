"""Every reason code a quarantine row may carry, with what it means. The stages and the ingest
emit them; the registry (registry.py) says which asset's quarantine may hold which."""

# raw_corpus: reading the source files (corpus.py)
INVALID_ENCODING = "invalid_encoding"  # bytes that are not valid in the source's encoding
INVALID_UNICODE = "invalid_unicode"  # a lone surrogate (a JSON \\ud83d escape): no UTF-8 can hold it
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"  # the text field is absent or null
TEXT_NOT_STRING = "text_not_string"  # a number, a list, an object
EMPTY_TEXT = "empty_text"  # nothing but spaces, control characters, escapes
MISSING_ID = "missing_id"  # absent, null, empty, or not a string or number
DUPLICATE_ID = "duplicate_id"  # an earlier document of the source has this id (the detail names where)
EMPTY_FILE = "empty_file"  # zero bytes: no records (one row, so the file is seen)
UNREADABLE_FILE = "unreadable_file"  # the file itself broke (a corrupt archive): the rows after it cannot be read
RECORD_TOO_LARGE = "record_too_large"  # over ingest.max_record_bytes; the rest of the file is read
FILE_TOO_LARGE = "file_too_large"  # a whole-file JSON over ingest.max_file_bytes
ROW_GROUP_TOO_LARGE = "row_group_too_large"  # a Parquet row group whose columns read are over ingest.max_file_bytes
RECORD_ERROR = "record_error"  # a record no rule expected broke the reader; the rest of the file is read

# the corpus filters and dedup
EMPTY_AFTER_CLEAN = "empty_after_clean"
TEXT_TOO_LONG = "text_too_long"  # over filter.max_doc_chars: dropped before it is tokenized
TOO_MANY_TOKENS = "too_many_tokens"
HIGH_PERPLEXITY = "high_perplexity"
PERPLEXITY_UNDEFINED = "perplexity_undefined"
DUPLICATE_TEXT = "duplicate_text"  # the same text up to whitespace as a document kept before it
NEAR_DUPLICATE = "near_duplicate"  # a MinHash near-duplicate of a document its cluster keeps

# the LLM stages and the release
EMPTY_GENERATION = "empty_generation"
BANNED_KEYWORD = "banned_keyword"
BELOW_THRESHOLD = "below_threshold"  # the release re-applies score.threshold (its inputs may be older)
PROMPT_OVER_BUDGET = "prompt_over_budget"
TOO_SHORT = "too_short"
REPEATED_PHRASE = "repeated_phrase"
REPEATED_INSTRUCTION = "repeated_instruction"  # a repeated line that does not open the instruction: Kun drops it
DUPLICATE_OUTPUT = "duplicate_output"
BROKEN_TEXT = "broken_text"  # U+FFFD: the model emitted bytes that are not UTF-8
