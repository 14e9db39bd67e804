# Helpers shared by every module's CMakeLists.txt.

# tandem_add_unit_test(NAME LIBS lib... [SOURCES extra.c...] [TIMEOUT s])
# Builds tests/unit/NAME.c (cmocka) into build/bin/NAME and registers it with
# CTest under the "unit" label. Tests find shared data through TANDEM_SHARED_DIR
# and skip with a message when it is absent.
function(tandem_add_unit_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "LIBS;SOURCES" ${ARGN})
  add_executable(${name} ${PROJECT_SOURCE_DIR}/tests/unit/${name}.c ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} PkgConfig::CMOCKA)
  target_compile_definitions(${name} PRIVATE
    TANDEM_SHARED_DIR="${TANDEM_SHARED_DIR}"
    TANDEM_BIN_DIR="${PROJECT_BINARY_DIR}/bin"
    TANDEM_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_test(NAME ${name} COMMAND ${name})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  set_tests_properties(${name} PROPERTIES LABELS unit TIMEOUT ${T_TIMEOUT}
    ENVIRONMENT "TANDEM_SHARED_DIR=${TANDEM_SHARED_DIR};TANDEM_BIN_DIR=${PROJECT_BINARY_DIR}/bin;TANDEM_DEVICE=cpu")
endfunction()

# tandem_add_integration_test(NAME COMMAND cmd... [TIMEOUT s])
# Registers a test that runs real processes (a script or a C driver) under the
# "integration" label.
function(tandem_add_integration_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "COMMAND" ${ARGN})
  add_test(NAME ${name} COMMAND ${T_COMMAND})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  set_tests_properties(${name} PROPERTIES LABELS integration TIMEOUT ${T_TIMEOUT}
    ENVIRONMENT "TANDEM_SHARED_DIR=${TANDEM_SHARED_DIR};TANDEM_BIN_DIR=${PROJECT_BINARY_DIR}/bin;TANDEM_SOURCE_DIR=${PROJECT_SOURCE_DIR};TANDEM_DEVICE=cpu")
endfunction()
